"""One rank of a parallel-equivalence run: build a toy model at a layout, take one training step.

The reference run (world size 1) initialises the model from a seed and saves its full weights;
every other layout loads its slice of those weights, runs the same global batch through
Megatron-Core's real schedule (`get_forward_backward_func`) under DDP, and writes the loss and
the full (TP-gathered, PP-renamed) gradients.  `tests/models/test_parallel_equivalence.py`
compares them; `scripts/gpu-check` runs the same worker on GPUs through NCCL.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GLOBAL_BATCH = 4
SEQ_LEN = 32
PAD_TAIL = 5  # the second sequence ends in padding, so the loss mask matters


def global_batch(vocab_size: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed tokens [G, S] and padding mask (True at pads) shared by every layout."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (GLOBAL_BATCH, SEQ_LEN), generator=gen)
    pad = torch.zeros_like(tokens, dtype=torch.bool)
    pad[1, -PAD_TAIL:] = True
    tokens[pad] = 0
    return tokens, pad


def run_step(
    family: str,
    parallel: dict,
    out_dir: str,
    *,
    reference_dir: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    micro_batch_size: int = 1,
    hf_overrides: dict | None = None,
) -> dict:
    """Build, (load,) step once, save loss and gradients under `out_dir`; returns the loss."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from nla_mcore.models.build import build_model, make_recipe
    from nla_mcore.models.hf_config import parse_hf_config
    from nla_mcore.models.sharding import TIED_OUTPUT, gather_full_tensors, load_full_state_dict
    from nla_mcore.runtime.distributed import init_distributed, set_seed
    from nla_mcore.runtime.parallel import (
        ParallelConfig,
        initialize_model_parallel,
        validate_layout,
    )
    from nla_mcore.toy import toy_hf_config
    from nla_mcore.train.engine import forward_backward, wrap_ddp
    from nla_mcore.train.lm import lm_forward_step, lm_microbatch

    torch.set_num_threads(1)
    _, dev = init_distributed(device)
    par = ParallelConfig(**parallel)
    hf = parse_hf_config(toy_hf_config(family, **(hf_overrides or {})))
    validate_layout(
        par,
        world_size=torch.distributed.get_world_size(),
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        num_layers=hf.num_layers,
        vocab_size=hf.vocab_size,
        seq_length=SEQ_LEN,
    )
    dp = initialize_model_parallel(par)
    set_seed(0)
    model = build_model(make_recipe(hf, par, dtype=dtype))
    offset = get_transformer_layer_offset(model.config)
    tp_group = ps.get_tensor_model_parallel_group()
    out = Path(out_dir)
    if reference_dir is None:
        _save_full_weights(model, out / "weights.safetensors")
    else:
        full = load_file(str(Path(reference_dir) / "weights.safetensors"))
        load_full_state_dict(
            model,
            {k: v.to(model.config.params_dtype) for k, v in full.items()},
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=par.tensor_parallel,
            layer_offset=offset,
            tied_embeddings=hf.tie_word_embeddings,
        )
    ddp = wrap_ddp(model)

    tokens, pad = global_batch(hf.vocab_size)
    per_rank = GLOBAL_BATCH // dp
    dp_rank = ps.get_data_parallel_rank()
    rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    microbatches = [
        {
            k: v.to(dev)
            for k, v in lm_microbatch(
                tokens[rows][i : i + micro_batch_size], pad[rows][i : i + micro_batch_size]
            ).items()
        }
        for i in range(0, per_rank, micro_batch_size)
    ]
    step = forward_backward(ddp, lm_forward_step, microbatches, seq_length=SEQ_LEN)

    grads = {n: p.main_grad.float() for n, p in ddp.module.named_parameters()}  # on device: NCCL
    full_grads = gather_full_tensors(model, grads, tp_group=tp_group, layer_offset=offset)
    if hf.tie_word_embeddings:
        full_grads.pop(TIED_OUTPUT, None)  # the last stage's copy of the tied embedding
    first_of_replica = (
        ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
    )
    if first_of_replica:
        pp_rank = ps.get_pipeline_model_parallel_rank()
        save_file(
            {k: v.contiguous() for k, v in full_grads.items()},
            str(out / f"grads_pp{pp_rank}.safetensors"),
        )
    if torch.distributed.get_rank() == 0:
        (out / "loss.json").write_text(json.dumps({"loss": step.loss, "tokens": step.num_tokens}))
    return {"loss": step.loss, "tokens": step.num_tokens}


def run_jobs(jobs: list[tuple]) -> list[dict]:
    """Several `run_step(family, parallel, out_dir, **kwargs)` jobs in one process.

    Each job re-creates the model-parallel groups, so one launch covers many layouts (a GPU
    launch costs seconds of imports and NCCL start-up; the CPU tests keep one launch per test).
    """
    return [
        run_step(family, parallel, out_dir, **kwargs) for family, parallel, out_dir, kwargs in jobs
    ]


def _save_full_weights(model, path: Path) -> None:
    state = {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters()}
    save_file(state, str(path))


def load_results(out_dir: str | Path) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and the merged full gradients written by `run_step` (all pipeline stages)."""
    out = Path(out_dir)
    loss = json.loads((out / "loss.json").read_text())["loss"]
    grads: dict[str, torch.Tensor] = {}
    for path in sorted(out.glob("grads_pp*.safetensors")):
        grads.update(load_file(str(path)))
    return loss, grads
