"""The Megatron-Core side of the inference tests: greedy explanations from our AV and
predictions from our AR, loaded from the nla-mcore checkpoints an SFT run wrote.

The greedy decode is deliberately the simplest correct one (the whole sequence is recomputed
for every new token, no KV cache): it is a reference for `NLAClient`, not an engine.  It uses
the training path's injection (`models.injection.inject`: a virtual id whose row is the
rescaled vector), so agreeing with `NLAClient`'s `inputs_embeds` splice on exported weights
checks the export, the sidecar and the client together.  Legend: B batch, S sequence, D width.
"""

from __future__ import annotations

import numpy as np
import torch


def _setup(ckpt_dir: str):
    from nla_mcore.models.build import make_recipe
    from nla_mcore.models.hf_config import load_hf_config
    from nla_mcore.runtime.distributed import init_distributed
    from nla_mcore.runtime.parallel import ParallelConfig, initialize_model_parallel

    init_distributed("cpu")
    parallel = ParallelConfig()
    initialize_model_parallel(parallel)
    hf = load_hf_config(f"{ckpt_dir}/hf")
    return make_recipe(hf, parallel, dtype="float32", backend="local")


def greedy_explanations(
    av_ckpt: str,
    prompt_ids: list[int],
    vectors_BD: torch.Tensor,
    tokens,
    injection_scale: float,
    stop_ids: list[int],
    max_new_tokens: int,
) -> tuple[list[list[int]], np.ndarray]:
    """(per vector, the greedily generated ids up to and including the first stop id;
    the logits [B, V] of the first of them, at the prompt's last position)."""
    from nla_mcore.models.injection import inject
    from nla_mcore.models.nla import build_av
    from nla_mcore.train.engine import forward_collect
    from nla_mcore.train.lm import lm_microbatch, logits_forward_step

    recipe = _setup(av_ckpt)
    model = build_av(recipe, ckpt_dir=av_ckpt).eval()
    vocab = recipe.hf.vocab_size
    b = len(vectors_BD)
    seqs_BS = torch.tensor([prompt_ids] * b)
    done = [False] * b
    out: list[list[int]] = [[] for _ in range(b)]
    first_logits_BV = None
    for _ in range(max_new_tokens):
        virtual_BS, table_BD = inject(
            seqs_BS, vectors_BD, tokens=tokens, vocab_size=vocab, injection_scale=injection_scale
        )
        batch = {**lm_microbatch(virtual_BS), "injection": table_BD}
        with torch.no_grad():
            logits_BSV = forward_collect(
                model, logits_forward_step, [batch], seq_length=seqs_BS.shape[1]
            )[0]
        next_B = logits_BSV[:, -1, :vocab].argmax(-1)
        if first_logits_BV is None:
            first_logits_BV = logits_BSV[:, -1, :vocab].float().numpy()
        for i, t in enumerate(next_B.tolist()):
            if not done[i]:
                out[i].append(t)
                done[i] = t in stop_ids
        if all(done):
            break
        seqs_BS = torch.cat([seqs_BS, next_B[:, None]], dim=1)
    return out, first_logits_BV


def ar_predictions(ar_ckpt: str, rows: list[list[int]], extraction_layer: int) -> torch.Tensor:
    """[B, D]: our AR's predictions for right-padded AR prompts `rows`."""
    from nla_mcore.models.nla import ar_recipe, build_ar
    from nla_mcore.train.engine import forward_collect
    from nla_mcore.train.lm import lm_microbatch
    from nla_mcore.train.nla_steps import ar_forward_step

    recipe = _setup(ar_ckpt)
    model = build_ar(ar_recipe(recipe, extraction_layer), ckpt_dir=ar_ckpt).eval()
    length = -(-max(map(len, rows)) // 8) * 8
    tokens_BS = torch.zeros((len(rows), length), dtype=torch.long)
    mask_BS = torch.zeros_like(tokens_BS, dtype=torch.bool)
    for b, row in enumerate(rows):
        tokens_BS[b, : len(row)] = torch.tensor(row)
        mask_BS[b, : len(row)] = True
    batch = {
        **lm_microbatch(tokens_BS, mask_BS),
        "readout_index": torch.tensor([len(r) - 1 for r in rows]),
    }
    with torch.no_grad():
        pred_BD, _ = forward_collect(model, ar_forward_step, [batch], seq_length=length)[0]
    return pred_BD.float().numpy()  # not a tensor: its shared-memory handle can outlive the rank
