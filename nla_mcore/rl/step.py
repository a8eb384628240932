"""One GRPO update of both models, on one screen (the pieces are `rl.*`):

    rollout     G samples per vector from the live AV (`rollout.NativeEngine`)
    parse       truncated / unparseable / too-long samples fail (`ar_reward.parse_rollout`)
    reward      the live AR reconstructs each vector; -mse_nrm, failures -2 (`ar_reward`, `grpo`)
    advantages  per group of G (`grpo.group_advantages`)
    reference   the SFT AV's log-probs, swapped into the live AV (`reference.ReferencePolicy`)
    AV update   PPO-clip + KL through Megatron-Core's schedule (`policy.grpo_forward_step`)
    AR update   its supervised step on the same explanations (`nla_steps.ar_forward_step`)

One PPO epoch per rollout (NLA.md: one optimizer step per rollout), so the old log-probs are
the engine's.  Every rank of a data-parallel replica handles the same vectors; DP > 1 is not
supported yet (refused).  Legend: B vectors, G samples per vector, N = B·G, T tokens, D width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state as ps

from nla_mcore.eval.scores import fve
from nla_mcore.models.injection import inject
from nla_mcore.rl import grpo
from nla_mcore.rl.ar_reward import ar_microbatches, parse_rollout, reward_path_mse, sample_mse
from nla_mcore.rl.policy import (
    LOSS_KEY,
    grpo_forward_step,
    response_logprobs_forward_step,
    rollout_microbatch,
)
from nla_mcore.rl.rollout import SamplingParams
from nla_mcore.train.engine import forward_backward, forward_collect
from nla_mcore.train.nla_steps import ar_forward_step
from nla_mcore.train.optim import optimizer_step


@dataclass(kw_only=True)
class GRPOSettings:
    samples_per_vector: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 150
    clip: float = 0.2
    kl_coef: float = 0.01
    kl_kind: str = "k1"
    reward: str = "linear"
    ar_max_length: int = 512
    micro_batch_size: int = 16
    seed: int = 0


@dataclass(kw_only=True)
class NLAPair:
    """What a GRPO step needs of the two models and their prompts."""

    av: object
    """`checkpointing.TrainedModel` of the AV."""
    ar: object
    engine: object
    reference: object
    tokenizer: object
    prompt_ids: list[int]
    tokens: object
    """`sidecar.Tokens` (the marker and its neighbours)."""
    injection_scale: float
    ar_template: str
    mse_scale: float | None
    stop_ids: tuple[int, ...]
    vocab_size: int


def grpo_step(pair: NLAPair, vectors_BD: torch.Tensor, step: int, cfg: GRPOSettings) -> dict:
    """Update both models once on `vectors_BD`; returns the step's metrics."""
    if ps.get_data_parallel_world_size() > 1:
        raise NotImplementedError("GRPO with data parallelism > 1 is not supported yet")
    g = cfg.samples_per_vector
    prompts_BS = torch.tensor([pair.prompt_ids] * len(vectors_BD))
    virtual_BS, table_BD = inject(
        prompts_BS,
        vectors_BD,
        tokens=pair.tokens,
        vocab_size=pair.vocab_size,
        injection_scale=pair.injection_scale,
    )
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        stop_ids=pair.stop_ids,
        n=g,
        seed=cfg.seed * 1_000_003 + step,
    )
    rollout = pair.engine.generate(virtual_BS, table_BD, params)

    # reward: the live AR on the parsed explanations
    parsed = parse_rollout(pair.tokenizer, rollout, pair.stop_ids)
    vectors_ND = vectors_BD.float().repeat_interleave(g, dim=0)
    ar_mbs, rows = ar_microbatches(
        pair.tokenizer,
        pair.ar_template,
        parsed,
        vectors_ND,
        max_length=cfg.ar_max_length,
        micro_batch_size=cfg.micro_batch_size,
        pad_id=pair.tokenizer.pad_token_id or 0,
    )
    row_mse = reward_path_mse(pair.ar.model, ar_mbs, pair.mse_scale)
    rewards_N = grpo.rewards(sample_mse(parsed, rows, row_mse), parsed.failed_N, cfg.reward)
    advantages_N = grpo.group_advantages(rewards_N, g)

    # the AV: reference pass, the trainer's own log-probs (health), the update
    av_mbs = [
        rollout_microbatch(
            virtual_BS, table_BD, rollout, g, rows=slice(a, a + cfg.micro_batch_size)
        )
        for a in range(0, len(rewards_N), cfg.micro_batch_size)
    ]
    logprob_step = partial(response_logprobs_forward_step, temperature=cfg.temperature)
    seq = max(mb["tokens"].shape[1] for mb in av_mbs)
    with pair.reference.swapped_in():
        ref_parts = forward_collect(pair.av.model, logprob_step, av_mbs, seq_length=seq)
    pair.av.model.eval()
    with torch.no_grad():
        live_parts = forward_collect(pair.av.model, logprob_step, av_mbs, seq_length=seq)
    pair.av.model.train()
    old_NT = rollout.logprobs_NT.cpu()
    mask_NT = torch.arange(old_NT.shape[1])[None, :] < rollout.lengths_N.cpu()[:, None]
    health = {}
    if ref_parts:  # the last pipeline stage
        ref_NT, live_NT = torch.cat(ref_parts).cpu(), torch.cat(live_parts).cpu()
        health = dict(
            logprob_gap=float((live_NT - old_NT).abs()[mask_NT].mean()),
            kl=float(grpo.kl_penalty(old_NT, ref_NT, mask_NT, cfg.kl_kind)),
            clip_fraction=float(
                grpo.policy_loss(live_NT, old_NT, advantages_N, mask_NT, cfg.clip)[1][
                    "clip_fraction"
                ]
            ),
        )
        for mb, a in zip(av_mbs, range(0, len(rewards_N), cfg.micro_batch_size), strict=True):
            rows_ = slice(a, a + len(mb["tokens"]))
            mb.update(
                old_logprobs=old_NT[rows_],
                ref_logprobs=ref_NT[rows_],
                advantages=advantages_N[rows_],
            )
    else:  # earlier stages run the schedule but never read these
        for mb in av_mbs:
            zeros = torch.zeros(len(mb["tokens"]), old_NT.shape[1])
            mb.update(old_logprobs=zeros, ref_logprobs=zeros, advantages=zeros[:, 0])
    pair.av.optimizer.zero_grad()
    av_loss = forward_backward(
        pair.av.model,
        partial(
            grpo_forward_step,
            temperature=cfg.temperature,
            clip=cfg.clip,
            kl_coef=cfg.kl_coef,
            kl_kind=cfg.kl_kind,
        ),
        av_mbs,
        seq_length=seq,
        loss_key=LOSS_KEY,
    )
    av_update = _update(pair.av, av_loss.loss, step, "AV")

    # the AR: its supervised step on the same explanations
    ar_update, ar_loss = None, None
    if ar_mbs:
        device = next(pair.ar.model.parameters()).device
        ar_mbs = [{k: v.to(device) for k, v in mb.items()} for mb in ar_mbs]
        pair.ar.optimizer.zero_grad()
        ar_loss = forward_backward(
            pair.ar.model,
            partial(ar_forward_step, mse_scale=pair.mse_scale),
            ar_mbs,
            seq_length=max(mb["tokens"].shape[1] for mb in ar_mbs),
            loss_key="ar_mse",
        )
        ar_update = _update(pair.ar, ar_loss.loss, step, "AR")

    scored = torch.tensor(rows, dtype=torch.long)
    metrics = dict(
        reward=float(rewards_N.mean()),
        failed_fraction=float(parsed.failed_N.float().mean()),
        **{f"failed_{k}": v for k, v in parsed.counts().items()},
        response_tokens=float(rollout.lengths_N.float().mean()),
        av_loss=av_loss.loss,
        av_grad_norm=av_update.grad_norm,
        lr=av_update.lr,
        **health,
    )
    if len(rows) > 1:  # FVE of the scored samples, rawvar baseline (eval.scores)
        scale = pair.mse_scale or math.sqrt(vectors_BD.shape[1])
        metrics["fve"] = fve(float(row_mse.mean()), vectors_ND[scored].numpy(), scale)
    if ar_update is not None:
        metrics.update(ar_loss=ar_loss.loss, ar_grad_norm=ar_update.grad_norm)
    return metrics


def _update(trained, loss: float, step: int, who: str):
    return optimizer_step(
        trained.optimizer,
        trained.scheduler,
        loss=loss,
        explain_failure=lambda value, norm: (
            f"GRPO step {step}: the {who} update is not finite (loss {value}, grad norm {norm})"
        ),
    )
