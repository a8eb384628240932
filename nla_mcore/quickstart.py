"""`nla-mcore quickstart`: the most end-to-end job there is, runnable on a laptop CPU.

Today it builds a tiny random model of a family from its HF-style config (no downloads),
tokenises a small embedded English corpus with the family's toy tokenizer, and trains it for a
few steps under the requested parallel layout (default: two `gloo` ranks, TP=2) through
Megatron-Core's schedule, DDP and optimizer, printing the loss of every step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from nla_mcore.runtime.parallel import ParallelConfig


@dataclass(kw_only=True, slots=True)
class QuickstartConfig:
    """Train a toy model for a few steps to show the whole stack works on this machine."""

    family: str = "qwen2"
    """Model family of the toy model: qwen2, llama or gemma3."""
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(tensor_parallel=2))
    """Parallel layout; the number of ranks is nproc."""
    nproc: int = 2
    """Ranks to launch (torchrun) when not already running under a launcher."""
    device: str = "cpu"
    """cpu (gloo, the CPU functional mode), cuda (NCCL) or auto."""
    steps: int = 12
    """Optimizer steps."""
    lr: float = 3e-3
    """Adam learning rate (constant)."""
    global_batch_size: int = 8
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 2
    """Sequences per forward/backward on one rank."""
    seq_length: int = 64
    """Tokens per training sequence."""
    seed: int = 1234
    """Seeds weights and data order."""

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError("global_batch_size must be a multiple of micro_batch_size")


def corpus_blocks(tokenizer, seq_length: int) -> torch.Tensor:
    """The toy corpus as one token stream (documents joined by EOS) cut into [N, S] blocks."""
    from nla_mcore.toy import toy_corpus

    ids: list[int] = []
    for doc in toy_corpus():
        ids.extend(tokenizer.encode(doc) + [tokenizer.eos_token_id])
    n = len(ids) // seq_length
    return torch.tensor(ids[: n * seq_length]).view(n, seq_length)


def step_microbatches(blocks, step, cfg, dp_rank, dp, device) -> list[dict]:
    """This DP rank's micro-batches for `step`: a seeded permutation, reshuffled each pass."""
    from nla_mcore.train.lm import lm_microbatch

    per_pass = blocks.shape[0] // cfg.global_batch_size
    epoch, index = divmod(step, per_pass)
    order = torch.randperm(
        blocks.shape[0], generator=torch.Generator().manual_seed(cfg.seed + epoch)
    )
    rows = order[index * cfg.global_batch_size : (index + 1) * cfg.global_batch_size]
    mine = blocks[rows.view(dp, -1)[dp_rank]]
    return [
        {k: v.to(device) for k, v in lm_microbatch(mine[i : i + cfg.micro_batch_size]).items()}
        for i in range(0, mine.shape[0], cfg.micro_batch_size)
    ]


def run(cfg: QuickstartConfig) -> list[float]:
    """Train on this rank; returns the per-step losses (the same on every rank)."""
    from megatron.core import parallel_state as ps

    from nla_mcore.models.build import build_model, make_recipe
    from nla_mcore.models.hf_config import parse_hf_config
    from nla_mcore.runtime.distributed import init_distributed, set_seed
    from nla_mcore.runtime.parallel import initialize_model_parallel, validate_layout
    from nla_mcore.toy import toy_hf_config
    from nla_mcore.toy_tokenizers import build_toy_tokenizer
    from nla_mcore.train.engine import forward_backward, wrap_ddp
    from nla_mcore.train.lm import lm_forward_step
    from nla_mcore.train.optim import OptimConfig, build_optimizer, build_scheduler, optimizer_step

    env, device = init_distributed(cfg.device)
    hf = parse_hf_config(toy_hf_config(cfg.family))
    dp = validate_layout(
        cfg.parallel,
        world_size=env.world_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        num_layers=hf.num_layers,
        vocab_size=hf.vocab_size,
        seq_length=cfg.seq_length,
    )
    if cfg.global_batch_size % (dp * cfg.micro_batch_size):
        raise ValueError(
            f"global_batch_size={cfg.global_batch_size} is not a multiple of "
            f"dp·micro_batch_size = {dp}·{cfg.micro_batch_size}"
        )
    initialize_model_parallel(cfg.parallel)
    set_seed(cfg.seed)
    model = wrap_ddp(build_model(make_recipe(hf, cfg.parallel)), distributed_optimizer=True)
    optim = OptimConfig(lr=cfg.lr, min_lr=cfg.lr, warmup_steps=0, decay="constant")
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, cfg.steps)
    blocks = corpus_blocks(build_toy_tokenizer(cfg.family), cfg.seq_length)
    say = print if env.rank == 0 else (lambda *a, **k: None)
    n_params = sum(p.numel() for p in model.parameters())
    say(
        f"[quickstart] {cfg.family} toy model, {hf.num_layers} layers, d={hf.hidden_size}; "
        f"world={env.world_size} (tp={cfg.parallel.tensor_parallel} pp={cfg.parallel.pipeline_parallel} "
        f"cp={cfg.parallel.context_parallel} dp={dp}) on {device}; {n_params:,} params on rank 0; "
        f"corpus: {blocks.numel():,} tokens in {blocks.shape[0]} sequences of {cfg.seq_length}"
    )
    losses = []
    for step in range(cfg.steps):
        start = time.perf_counter()
        microbatches = step_microbatches(blocks, step, cfg, ps.get_data_parallel_rank(), dp, device)
        optimizer.zero_grad()
        result = forward_backward(model, lm_forward_step, microbatches, seq_length=cfg.seq_length)
        update = optimizer_step(
            optimizer,
            scheduler,
            loss=result.loss,
            explain_failure=lambda loss, norm, step=step: f"step {step}: loss {loss}, norm {norm}",
        )
        grad_norm = update.grad_norm
        losses.append(result.loss)
        rate = result.num_tokens / (time.perf_counter() - start)
        say(
            f"[quickstart] step {step + 1:3d}/{cfg.steps}  loss {result.loss:.4f}  "
            f"grad-norm {grad_norm:.3f}  {rate:,.0f} tok/s"
        )
    say(f"[quickstart] done: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {cfg.steps} steps")
    return losses


def main(argv: list[str] | None = None) -> None:
    """Rank entry point (`python -m nla_mcore.quickstart key=value ...` under torchrun)."""
    import sys

    from nla_mcore.config import load_config

    args = sys.argv[1:] if argv is None else argv
    config_path = None
    if args[:1] == ["--config"]:
        config_path, args = args[1], args[2:]
    run(load_config(QuickstartConfig, config_path, args))


if __name__ == "__main__":
    main()
