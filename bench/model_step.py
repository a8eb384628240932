"""Forward + backward of a Qwen2.5-1.5B-shaped model: the project's local spec vs Megatron-Core's.

Usage (one GPU):  python bench/model_step.py [--quick]

Both models are Megatron-Core `GPTModel`s with the same `TransformerConfig`, bf16, random
weights, TP=1; they differ only in the layer spec:
  * ours   — `nla_mcore.models.specs` local spec: SDPA attention (flash kernel), our RMSNorm;
  * stock  — `get_gpt_layer_local_spec(normalization="RMSNorm")`: `DotProductAttention`
             (baddbmm + masked softmax), `WrappedTorchNorm`.
A bf16 GEMM (8192^3) is timed in the same run as the ceiling.

FLOPs per step = 6 · P_matmul · tokens + 12 · L · h_attn · s² · b, where P_matmul counts the
weights of every matmul (all linear layers and the output projection, not the embedding lookup)
and the attention term counts QK^T and AV forward (2 · 2 · s² · h_attn per layer and sequence)
times 3 for forward + backward, without halving for causality (the convention of Megatron-LM's
and our FINDINGS' numbers, so figures compare).  MFU = achieved FLOP/s / 790 TFLOP/s (the bf16
matmul rate measured on these H100s); the ratio to this run's GEMM is printed too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.shapes import QWEN25_1P5B  # noqa: E402

PEAK_TFLOPS = 790.0


def time_cuda(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of `fn()` over `iters` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gemm_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_cuda(lambda: a @ b, warmup=3, iters=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def step_flops(model, hf, batch: int, seq: int) -> float:
    matmul_params = sum(
        p.numel()
        for n, p in model.named_parameters()
        if p.dim() == 2 and "word_embeddings" not in n
    )
    if hf.tie_word_embeddings:  # the output projection reuses the embedding matrix
        matmul_params += hf.vocab_size * hf.hidden_size
    attn = 12 * hf.num_layers * hf.num_attention_heads * hf.head_dim * seq * seq * batch
    return 6 * matmul_params * batch * seq + attn


def build(spec_name: str, hf):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from nla_mcore.models.build import build_model, make_recipe, transformer_config
    from nla_mcore.runtime.parallel import ParallelConfig

    recipe = make_recipe(hf, ParallelConfig(), dtype="bfloat16", backend="local")
    if spec_name == "ours":
        return build_model(recipe)
    config = transformer_config(recipe, use_cpu_initialization=False)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=hf.vocab_size,
        max_sequence_length=hf.max_position_embeddings,
        share_embeddings_and_output_weights=hf.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(hf.rope.theta),
    )
    return model.cuda()


def bench_model(spec_name, hf, shapes, warmup, iters):
    model = build(spec_name, hf)
    rows = []
    for batch, seq in shapes:
        tokens = torch.randint(0, hf.vocab_size, (batch, seq), device="cuda")
        positions = torch.arange(seq, device="cuda").expand(batch, seq)

        def step(model=model, tokens=tokens, positions=positions):
            loss = model(tokens, positions, None, labels=tokens)
            loss.float().mean().backward()

        torch.cuda.reset_peak_memory_stats()
        ms = time_cuda(step, warmup, iters)
        peak = torch.cuda.max_memory_allocated() / 2**30
        tflops = step_flops(model, hf, batch, seq) / (ms * 1e-3) / 1e12
        rows.append(
            dict(
                spec=spec_name,
                batch=batch,
                seq=seq,
                ms=ms,
                tok_s=batch * seq / (ms * 1e-3),
                tflops=tflops,
                peak_gib=peak,
            )
        )
        model.zero_grad(set_to_none=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    warmup, iters = (2, 4) if args.quick else (3, 10)

    from nla_mcore.models.hf_config import parse_hf_config
    from nla_mcore.runtime.distributed import init_distributed, set_seed
    from nla_mcore.runtime.parallel import ParallelConfig, initialize_model_parallel

    init_distributed("cuda")
    initialize_model_parallel(ParallelConfig())
    set_seed(0)
    hf = parse_hf_config(QWEN25_1P5B)
    shapes = [(32, 256), (8, 1024)]
    ceiling = gemm_tflops()
    rows = []
    for spec in ("stock", "ours"):
        rows += bench_model(spec, hf, shapes, warmup, iters)
        torch.cuda.empty_cache()

    print(
        f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  bf16 GEMM 8192^3: "
        f"{ceiling:.0f} TFLOP/s (this run)"
    )
    print(
        f"{'spec':6} {'batch x seq':>12} {'ms/step':>8} {'tokens/s':>10} {'TFLOP/s':>8} "
        f"{'MFU@790':>8} {'/GEMM':>6} {'peak GiB':>8} {'vs stock':>8}"
    )
    stock = {(r["batch"], r["seq"]): r for r in rows if r["spec"] == "stock"}
    for r in rows:
        speedup = stock[(r["batch"], r["seq"])]["ms"] / r["ms"]
        print(
            f"{r['spec']:6} {r['batch']:>5} x {r['seq']:<5} {r['ms']:8.1f} {r['tok_s']:10,.0f} "
            f"{r['tflops']:8.0f} {r['tflops'] / PEAK_TFLOPS:8.1%} {r['tflops'] / ceiling:6.1%} "
            f"{r['peak_gib']:8.1f} {speedup:7.2f}x"
        )
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
