"""Helpers and rank programs for the conversion tests: tiny random HF models, conversion,
and logits of a converted checkpoint at any layout."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SEQ = 16


def make_hf_model(family: str, directory: str | Path, *, seed: int = 0, max_shard_size="200KB"):
    """A tiny HF model of `family` with every weight random (norms too), saved as sharded
    safetensors with the toy tokenizer; returns the directory."""
    import transformers

    from nla_mcore.toy import toy_hf_config
    from nla_mcore.toy_tokenizers import save_toy_tokenizer

    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**toy_hf_config(family))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random around the identity, so a swapped norm is visible
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if family == "gemma3" else 1.0))
            else:
                p.copy_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size)
    save_toy_tokenizer(family, directory)
    return Path(directory)


def fixed_tokens(vocab_size: int, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(7))


def hf_logits(directory, tokens) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits.float()


def convert_rank(hf_dir: str, out_dir: str, parallel: dict, dtype: str = "float32", device: str = "cpu"):
    from nla_mcore.converters.hf_to_mcore import convert
    from nla_mcore.runtime.parallel import ParallelConfig

    convert(hf_dir, out_dir, ParallelConfig(**parallel), dtype=dtype, device=device)


def logits_rank(ckpt_dir: str, parallel: dict, tokens_path: str, out_path: str, device: str = "cpu"):
    """Rebuild the checkpoint's model at `parallel`, load it, write full logits (last stage)."""
    from megatron.core import parallel_state as ps

    from nla_mcore.converters.checkpoint import load_checkpoint, read_meta, recipe_from_meta
    from nla_mcore.models.build import build_model
    from nla_mcore.runtime.distributed import init_distributed
    from nla_mcore.runtime.parallel import ParallelConfig, initialize_model_parallel
    from nla_mcore.train.engine import forward_collect
    from nla_mcore.train.lm import lm_microbatch, logits_forward_step

    _, dev = init_distributed(device)
    par = ParallelConfig(**parallel)
    initialize_model_parallel(par)
    recipe = recipe_from_meta(read_meta(ckpt_dir), par)
    model = build_model(recipe, perform_initialization=False)
    load_checkpoint(model, ckpt_dir)
    model.eval()
    tokens = load_file(tokens_path)["tokens"]
    batch = {k: v.to(dev) for k, v in lm_microbatch(tokens).items()}
    with torch.no_grad():
        out = forward_collect(model, logits_forward_step, [batch], seq_length=tokens.shape[1])
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        save_file({"logits": out[0].float().cpu().contiguous()}, out_path)


def logits_jobs(jobs: list[tuple]) -> None:
    """Several `logits_rank` jobs (same world size) in one launch."""
    for job in jobs:
        logits_rank(*job)


def error_cases(cases: list[tuple[str, str, dict]]) -> list[str]:
    """Run conversions expected to fail (one process); return each error message."""
    messages = []
    for hf_dir, out_dir, parallel in cases:
        try:
            convert_rank(hf_dir, out_dir, parallel)
        except Exception as err:  # noqa: BLE001 - the test inspects the message
            messages.append(f"{type(err).__name__}: {err}")
        else:
            messages.append("no error")
    return messages


def slow_export(ckpt_dir: str, out_dir: str, marker: str) -> None:
    """Export that announces progress in `marker` and sleeps per layer (for the kill test)."""
    import time

    from nla_mcore.converters.mcore_to_hf import export_to_hf

    def progress(msg):
        Path(marker).write_text(msg)
        time.sleep(2.0)

    export_to_hf(ckpt_dir, out_dir, max_shard_bytes=100_000, on_progress=progress)


if __name__ == "__main__":
    import sys

    slow_export(*sys.argv[1:4])
