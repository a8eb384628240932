"""The AR's side of a GRPO step: parse the rollouts, score them with the live AR (the reward
path), and train the AR on the same explanations (its supervised step).

* **Parse**: a sample that hit `max_new_tokens` is `truncated`; one whose text has no
  `<explanation>...</explanation>` is `unparseable`; one whose AR prompt is longer than
  `max_length` is `too_long`.  Each failed sample gets the failure reward (`rl.grpo`) and no
  AR prompt at all.
* **Reward path**: the parsed explanations as AR micro-batches (NLA.md's AR prompt, right
  padding, read-out at the last token), a forward-only pass of the live AR, and `mse_nrm`
  through the fused kernel (`kernels.normalized_mse`).  Under CP each sample is owned by one
  CP rank (summed over the group); under PP the last stage computes and broadcasts, so every
  rank has the rewards.
* **Training path**: the same micro-batches with their targets through `ar_forward_step`'s
  loss (`models.ar.ar_loss`): at the weights of the reward pass the two give the same mse_nrm.
Legend: N samples, D width, B micro-batch, S padded length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps

from nla_mcore import prompts
from nla_mcore.rl.rollout.interface import FINISH_STOP, Rollout

TRUNCATED, UNPARSEABLE, TOO_LONG = "truncated", "unparseable", "too_long"


@dataclass
class ParsedRollout:
    texts: list[str | None]
    """The parsed explanation per sample (None where it failed)."""
    failures: list[str | None]
    """None, TRUNCATED, UNPARSEABLE or TOO_LONG per sample."""

    @property
    def failed_N(self) -> torch.Tensor:
        return torch.tensor([f is not None for f in self.failures])

    def counts(self) -> dict[str, int]:
        return {kind: self.failures.count(kind) for kind in (TRUNCATED, UNPARSEABLE, TOO_LONG)}


def parse_rollout(tokenizer, rollout: Rollout, stop_ids) -> ParsedRollout:
    """Decode each sample up to its stop id and parse its explanation."""
    stops = set(stop_ids)
    texts, failures = [], []
    for i, reason in enumerate(rollout.finish_reasons):
        ids = rollout.sample_tokens(i)
        if reason != FINISH_STOP:
            texts.append(None)
            failures.append(TRUNCATED)
            continue
        text = prompts.parse_explanation(
            tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True)
        )
        texts.append(text)
        failures.append(None if text is not None else UNPARSEABLE)
    return ParsedRollout(texts, failures)


def ar_microbatches(
    tokenizer,
    template: str,
    parsed: ParsedRollout,
    vectors_ND: torch.Tensor,
    *,
    max_length: int,
    micro_batch_size: int,
    pad_id: int,
    pad_multiple: int = 8,
) -> tuple[list[dict], list[int]]:
    """(AR micro-batches of the parsed samples, the sample index of each of their rows, in
    order); samples whose prompt exceeds `max_length` are marked TOO_LONG in `parsed`."""
    rows: list[tuple[int, list[int]]] = []
    for i, text in enumerate(parsed.texts):
        if text is None:
            continue
        ids = prompts.ar_prompt_ids(tokenizer, text, template)
        if len(ids) > max_length:
            parsed.texts[i], parsed.failures[i] = None, TOO_LONG
            continue
        rows.append((i, ids))
    microbatches = []
    for start in range(0, len(rows), micro_batch_size):
        chunk = rows[start : start + micro_batch_size]
        longest = max(len(ids) for _, ids in chunk)
        length = -(-longest // pad_multiple) * pad_multiple
        tokens_BS = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        for b, (_, ids) in enumerate(chunk):
            tokens_BS[b, : len(ids)] = torch.tensor(ids)
        b, s = tokens_BS.shape
        microbatches.append(
            dict(
                tokens=tokens_BS,
                position_ids=torch.arange(s).expand(b, s).contiguous(),
                readout_index=torch.tensor([len(ids) - 1 for _, ids in chunk]),
                target=vectors_ND[[i for i, _ in chunk]].float(),
            )
        )
    return microbatches, [i for i, _ in rows]


def reward_path_mse(ar_model, microbatches: list[dict], mse_scale: float | None) -> torch.Tensor:
    """mse_nrm [rows] of the live AR on `microbatches` (forward only), on every rank."""
    from functools import partial

    from nla_mcore.kernels import normalized_mse
    from nla_mcore.train.engine import forward_collect
    from nla_mcore.train.nla_steps import ar_forward_step

    rows = sum(len(mb["tokens"]) for mb in microbatches)
    device = next(ar_model.parameters()).device
    mse = torch.zeros(rows, dtype=torch.float32, device=device)
    if not microbatches:
        return mse
    eval_batches = [{k: v for k, v in mb.items() if k != "target"} for mb in microbatches]
    was_training = ar_model.training
    ar_model.eval()
    with torch.no_grad():
        outputs = forward_collect(
            ar_model,
            partial(ar_forward_step),
            [{k: v.to(device) for k, v in mb.items()} for mb in eval_batches],
            seq_length=max(mb["tokens"].shape[1] for mb in microbatches),
        )
    ar_model.train(was_training)
    if outputs:  # the last pipeline stage
        parts, cp_group = [], ps.get_context_parallel_group()
        for (pred_BD, owned_B), mb in zip(outputs, microbatches, strict=True):
            target_BD = mb["target"].to(device)
            mse_B = normalized_mse(
                pred_BD.float(), target_BD, pred_scale=mse_scale, target_scale=mse_scale
            )
            parts.append(mse_B * owned_B.to(mse_B.dtype))
        mse = torch.cat(parts)
        if ps.get_context_parallel_world_size() > 1:
            torch.distributed.all_reduce(mse, group=cp_group)  # one owner per sample
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(
            mse,
            src=ps.get_pipeline_model_parallel_last_rank(),
            group=ps.get_pipeline_model_parallel_group(),
        )
    return mse


def sample_mse(parsed: ParsedRollout, row_sample: list[int], row_mse: torch.Tensor):
    """[N] mse_nrm per sample (NaN where it failed: `rl.grpo.rewards` never reads those)."""
    out = torch.full((len(parsed.failures),), float("nan"))
    out[torch.tensor(row_sample, dtype=torch.long)] = row_mse.cpu()
    return out
