"""Benchmark of the fused kernels against PyTorch eager, torch.compile and Megatron-Core, one GPU.

    python bench/kernels.py [--quick] [--skip-logprob] [--skip-compile] [--skip-sweep]

Prints, in one run: the device-to-device copy bandwidth (the ceiling); for the normalised MSE at
N in {512, 4096, 32768} x D in {3584, 8192} the time and achieved bandwidth of our kernels, PyTorch
eager and torch.compile, forward and forward+backward, with ratios; a sweep of launch configs; and
for the log-probs at T = 16384, V = 152064 (Qwen) tokens/s and peak memory against Megatron-Core's
`vocab_parallel_cross_entropy` on an fp32 copy divided by the temperature, at tp = 1 and 2.

Bytes are those that must move, each counted once:
- normalised MSE forward: read pred and target, write N fp32: 2·N·D·e + 4·N.
- forward+backward: the forward's bytes plus the backward's (read pred, target and the upstream
  [N] gradient, write the [N, D] gradient): 5·N·D·e + 8·N. Under autograd the upstream gradient is
  unknown while the forward runs, so the backward must read the inputs again (or something of the
  same size that the forward saved); a single fused loss-and-gradient kernel for a known upstream
  gradient would move 3·N·D·e, but that is not what a training step through autograd can do.
- log-probs (per rank, V/tp columns): forward reads the bf16 logits once; backward reads them and
  writes the bf16 gradient.

Timing: `triton.testing.do_bench` medians (events around each call after warm-up, host launch
overhead included; it also flushes L2 between runs) for what a caller sees, and
`do_bench_cudagraph` medians for the device time of our kernels alone and of a copy of the same
bytes (at N = 512 a kernel takes a few µs, less than launching it from Python). Inputs rotate over
enough buffers to exceed 3x the 50 MB L2. tp = 2 is simulated on one GPU: each
rank's work is the same computation on half the vocab, so both implementations run on a
[T, V/2] shard with a one-rank group; the two all-reduces of [T]-sized tensors are not timed.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

L2_BYTES = 50 * 2**20
QWEN_VOCAB = 152064


@dataclass
class Timer:
    warmup_ms: int
    rep_ms: int

    def __call__(self, fn: Callable[[], object], grad_to_none=None) -> float:
        """Median milliseconds of fn() between events, host launch overhead included."""
        from triton.testing import do_bench

        return do_bench(
            fn,
            warmup=self.warmup_ms,
            rep=self.rep_ms,
            grad_to_none=grad_to_none,
            return_mode="median",
        )

    def graph(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of fn() replayed from a CUDA graph: device time, no launch gaps."""
        from triton.testing import do_bench_cudagraph

        return do_bench_cudagraph(fn, rep=20, return_mode="median")  # 20 ms of unrolled calls


def rotating(make: Callable[[], tuple], set_bytes: int) -> tuple[list[tuple], Callable[[], tuple]]:
    """Enough input sets to exceed 3x L2, and a function returning the next one in turn."""
    sets = [make() for _ in range(max(1, min(64, math.ceil(3 * L2_BYTES / set_bytes))))]
    state = {"i": 0}

    def next_set() -> tuple:
        state["i"] = (state["i"] + 1) % len(sets)
        return sets[state["i"]]

    return sets, next_set


def copy_bandwidth(timer: Timer, nbytes: int, graph: bool = False) -> float:
    """GB/s of dst.copy_(src) moving nbytes (half read, half written), over rotating buffers."""
    n = nbytes // 4
    sets, nxt = rotating(
        lambda: (
            torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_(),
            torch.empty(n, dtype=torch.bfloat16, device="cuda"),
        ),
        4 * n,
    )
    fn = lambda: (lambda s, d: d.copy_(s))(*nxt())  # noqa: E731
    ms = timer.graph(fn) if graph else timer(fn)
    return 4 * n / ms / 1e6


# --- normalised MSE -------------------------------------------------------------------------------


def nmse_inputs(n: int, d: int, dtype: torch.dtype):
    e = torch.finfo(dtype).bits // 8

    def make():
        pred = (torch.randn(n, d, device="cuda") * 30).to(dtype).requires_grad_()
        target = (torch.randn(n, d, device="cuda") * 30).to(dtype)
        gout = torch.randn(n, device="cuda")
        return pred, target, gout

    return rotating(make, 2 * n * d * e)


def nmse_times(fn, sets, nxt, timer: Timer) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of fn(pred, target) over rotating inputs."""

    def fwd():
        p, t, _ = nxt()
        with torch.no_grad():
            fn(p, t)

    def fwd_bwd():
        p, t, g = nxt()
        fn(p, t).backward(g)

    grads = [s[0] for s in sets]
    return timer(fwd), timer(fwd_bwd, grad_to_none=grads)


def nmse_table(args, timer: Timer, copy_gbs: float) -> None:
    from nla_mcore.kernels.nmse import normalized_mse, normalized_mse_reference

    ns = (512, 4096) if args.quick else (512, 4096, 32768)
    impls = {
        "ours": lambda p, t: normalized_mse(p, t, backend="triton"),
        "eager": normalized_mse_reference,
    }
    if not args.skip_compile:
        impls["compile"] = torch.compile(normalized_mse_reference, dynamic=False)
    print(f"\n## Normalised MSE, {args.dtype}; copy ceiling {copy_gbs:.0f} GB/s\n")
    print(
        "| N | D | pass | ours µs | ours GB/s | % copy | eager µs | compile µs | × eager | "
        "× compile | kernels µs (graph) | kernels % copy | copy-at-size % (graph) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for d in (3584, 8192):
        for n in ns:
            nmse_rows(n, d, getattr(torch, args.dtype), impls, timer, copy_gbs)


def nmse_rows(n, d, dtype, impls, timer: Timer, copy_gbs: float) -> None:
    e = torch.finfo(dtype).bits // 8
    torch._dynamo.reset()  # compile afresh per shape (static shapes, no recompile limit)
    sets, nxt = nmse_inputs(n, d, dtype)
    check_nmse(sets[0], impls["ours"])
    times = {name: nmse_times(fn, sets, nxt, timer) for name, fn in impls.items()}
    kernels = nmse_kernel_times(n, d, nxt, timer)
    nbytes = (2 * n * d * e + 4 * n, 5 * n * d * e + 8 * n)
    for k, label in enumerate(("fwd", "fwd+bwd")):
        ours = times["ours"][k]
        gbs = nbytes[k] / ours / 1e6
        kernel_gbs = nbytes[k] / kernels[k] / 1e6
        at_size = copy_bandwidth(timer, nbytes[k], graph=True)
        comp = times.get("compile", (float("nan"),) * 2)[k]
        print(
            f"| {n} | {d} | {label} | {ours * 1e3:.1f} | {gbs:.0f} | {100 * gbs / copy_gbs:.0f} "
            f"| {times['eager'][k] * 1e3:.1f} | {comp * 1e3:.1f} | {times['eager'][k] / ours:.1f} "
            f"| {comp / ours:.2f} | {kernels[k] * 1e3:.1f} | {100 * kernel_gbs / copy_gbs:.0f} "
            f"| {100 * at_size / copy_gbs:.0f} |",
            flush=True,
        )
    del sets


def nmse_kernel_times(n, d, nxt, timer: Timer) -> tuple[float, float]:
    """(forward kernel ms, forward + backward kernels ms) under CUDA graphs, default config."""
    from nla_mcore.kernels._nmse_triton import nmse_backward, nmse_forward

    s = math.sqrt(d)
    fwd = timer.graph(lambda: nmse_forward(*nxt()[:2], s, s))
    bwd = timer.graph(lambda: (lambda p, t, g: nmse_backward(p, t, g, s, s))(*nxt()))
    return fwd, fwd + bwd


def check_nmse(inputs, ours) -> None:
    """Refuse to time a kernel that is wrong on these inputs (vs the fp64 reference)."""
    from nla_mcore.kernels.nmse import normalized_mse_reference

    p, t, _ = inputs
    with torch.no_grad():
        err = rel_err(ours(p, t), normalized_mse_reference(p.double(), t.double()))
    if not err < 1e-5:
        raise AssertionError(f"normalised MSE is wrong before timing: rel. error {err:.2e}")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def nmse_sweep(args, timer: Timer, copy_gbs: float) -> None:
    """Launch configs of the two kernels alone (no autograd), as % of the copy ceiling."""
    from nla_mcore.kernels._nmse_triton import NMSEConfig

    dtype = getattr(torch, args.dtype)
    configs = [
        NMSEConfig(),
        NMSEConfig(num_warps=4),
        NMSEConfig(num_warps=8),
        NMSEConfig(num_warps=16),
        NMSEConfig(rows=2),
        NMSEConfig(block_d=1024),
        NMSEConfig(block_d=2048, num_warps=8),
    ]
    print(
        f"\n## Normalised MSE launch configs ({args.dtype}), CUDA-graph device time, % of copy "
        "(fwd / bwd kernel)\n"
    )
    print("| N | D | " + " | ".join(cfg_name(c) for c in configs) + " |")
    print("|---|---|" + "---|" * len(configs))
    for d in (3584, 8192):
        for n in (4096,) if args.quick else (4096, 32768):
            cells = sweep_shape(n, d, dtype, configs, timer, copy_gbs)
            print(f"| {n} | {d} | " + " | ".join(cells) + " |", flush=True)


def sweep_shape(n, d, dtype, configs, timer: Timer, copy_gbs: float) -> list[str]:
    from nla_mcore.kernels._nmse_triton import nmse_backward, nmse_forward

    e = torch.finfo(dtype).bits // 8
    sets, nxt = nmse_inputs(n, d, dtype)
    s = math.sqrt(d)

    def fwd(cfg):
        p, t, _ = nxt()
        nmse_forward(p, t, s, s, cfg)

    def bwd(cfg):
        p, t, g = nxt()
        nmse_backward(p, t, g, s, s, cfg=cfg)

    cells = []
    for cfg in configs:
        fwd_ms, bwd_ms = timer.graph(lambda c=cfg: fwd(c)), timer.graph(lambda c=cfg: bwd(c))
        fwd_pct = 100 * (2 * n * d * e + 4 * n) / fwd_ms / 1e6 / copy_gbs
        bwd_pct = 100 * (3 * n * d * e + 4 * n) / bwd_ms / 1e6 / copy_gbs
        cells.append(f"{fwd_pct:.0f} / {bwd_pct:.0f}")
    return cells


def cfg_name(cfg) -> str:
    return f"B={cfg.block_d or 'row'} R={cfg.rows} W={cfg.num_warps or 'auto'}"


# --- log-probs ------------------------------------------------------------------------------------


def init_megatron() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)


def peak_extra_gib(fn: Callable[[], object]) -> float:
    """Peak memory above what was allocated before one call of fn, in GiB."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def logprob_impls(temperature: float):
    from nla_mcore.kernels.logprob import megatron_reference_logprobs, vocab_parallel_logprobs

    return {
        "ours": lambda x, t: vocab_parallel_logprobs(x, t, temperature=temperature),
        "ours+entropy": lambda x, t: sum(
            vocab_parallel_logprobs(x, t, temperature=temperature, with_entropy=True)
        ),
        "megatron": lambda x, t: megatron_reference_logprobs(x, t, temperature),
    }


def logprob_table(args, timer: Timer) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    init_megatron()
    try:
        logprob_rows(args, timer)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def logprob_rows(args, timer: Timer) -> None:
    t_tokens = 4096 if args.quick else 16384
    temperature = 0.7
    impls = logprob_impls(temperature)
    print(
        f"\n## Log-probs, T = {t_tokens}, V = {QWEN_VOCAB}, bf16 logits, temperature "
        f"{temperature}\n"
    )
    print(
        "| tp | impl | fwd ms | fwd tok/s | fwd+bwd ms | fwd+bwd tok/s | peak extra GiB "
        "(fwd+bwd) | GB/s fwd / bwd | × Megatron fwd / fwd+bwd |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for tp in (1, 2):
        v = QWEN_VOCAB // tp
        x = (torch.randn(t_tokens, v, device="cuda") * 4).bfloat16().requires_grad_()
        tgt = torch.randint(0, v, (t_tokens,), device="cuda")
        check_logprobs(x, tgt, impls)
        rows = {name: logprob_row(fn, x, tgt, timer) for name, fn in impls.items()}
        ref = rows["megatron"]
        for name, (fwd, fb, peak) in rows.items():
            bw = (
                f"{x.numel() * 2 / fwd / 1e6:.0f} / {x.numel() * 4 / (fb - fwd) / 1e6:.0f}"
                if name != "megatron"
                else ""
            )
            print(
                f"| {tp} | {name} | {fwd:.2f} | {t_tokens / fwd * 1e3:.3g} | {fb:.2f} | "
                f"{t_tokens / fb * 1e3:.3g} | {peak:.2f} | {bw} | "
                f"{ref[0] / fwd:.1f} / {ref[1] / fb:.1f} |",
                flush=True,
            )
        del x, tgt


def logprob_row(fn, x, tgt, timer: Timer) -> tuple[float, float, float]:
    """(forward ms, forward+backward ms, peak GiB above the inputs for forward+backward)."""

    def fwd():
        with torch.no_grad():
            fn(x, tgt)

    def fwd_bwd():
        fn(x, tgt).sum().backward()

    return timer(fwd), timer(fwd_bwd, grad_to_none=[x]), peak_extra_gib(fwd_bwd)


def check_logprobs(x, tgt, impls) -> None:
    """Ours against Megatron-Core on these logits before timing (fp32 paths: 1e-5)."""
    with torch.no_grad():
        err = rel_err(impls["ours"](x, tgt), impls["megatron"](x, tgt))
    print(f"log-probs: rel. error vs Megatron-Core {err:.1e}")
    if not err < 1e-5:
        raise AssertionError(f"log-probs are wrong before timing: rel. error {err:.2e}")


def logprob_sweep(args, timer: Timer, copy_gbs: float) -> None:
    from nla_mcore.kernels._logprob_triton import LogprobConfig, local_stats, logits_grad

    t_tokens, v = (4096 if args.quick else 16384), QWEN_VOCAB
    x = (torch.randn(t_tokens, v, device="cuda") * 4).bfloat16()
    tgt = torch.randint(0, v, (t_tokens,), device="cuda")
    stats = torch.empty(t_tokens, 4, device="cuda")
    lse, g = torch.randn(t_tokens, device="cuda") + 14, torch.randn(t_tokens, device="cuda")
    grad = torch.empty_like(x)
    print(
        f"\n## Log-prob kernel configs (T = {t_tokens}, V = {v}), % of copy: stats / "
        "stats+entropy / grad\n"
    )
    print("| block_v | warps | stats | stats+entropy | grad |")
    print("|---|---|---|---|---|")
    for block_v, warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16)):
        cfg = LogprobConfig(block_v=block_v, num_warps=warps)
        st = timer(lambda c=cfg: local_stats(x, tgt, 0, 1.0, False, stats, c))
        ste = timer(lambda c=cfg: local_stats(x, tgt, 0, 1.0, True, stats, c))
        gr = timer(lambda c=cfg: logits_grad(x, tgt, lse, None, g, None, 0, 1.0, grad, c))
        pct = [100 * x.numel() * 2 / ms / 1e6 / copy_gbs for ms in (st, ste)]
        pct.append(100 * x.numel() * 4 / gr / 1e6 / copy_gbs)
        print(f"| {block_v} | {warps} | " + " | ".join(f"{p:.0f}" for p in pct) + " |", flush=True)


# --- main -----------------------------------------------------------------------------------------


def section(name: str, fn: Callable[[], None]) -> None:
    """Run one part; a failure is printed and the next part still runs (one GPU call is scarce)."""
    try:
        fn()
    except Exception:  # noqa: BLE001 - report and go on to the next table
        print(f"\n!! section {name} failed:", flush=True)
        traceback.print_exc(file=sys.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and shorter timing")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--skip-compile", action="store_true", help="no torch.compile baseline")
    ap.add_argument("--skip-sweep", action="store_true", help="no launch-config sweeps")
    ap.add_argument("--skip-logprob", action="store_true", help="no log-prob tables")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA device")
    import triton

    timer = Timer(10, 50) if args.quick else Timer(25, 200)
    print(
        f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton "
        f"{triton.__version__} | {datetime.datetime.now():%Y-%m-%d %H:%M} | "
        f"{' '.join(sys.argv)}"
    )
    copy_gbs = copy_bandwidth(timer, 2**31)
    print(f"device-to-device copy of 1 GiB: {copy_gbs:.0f} GB/s (read + written)")
    section("nmse", lambda: nmse_table(args, timer, copy_gbs))
    if not args.skip_logprob:
        section("logprob", lambda: logprob_table(args, timer))
    if not args.skip_sweep:
        section("nmse sweep", lambda: nmse_sweep(args, timer, copy_gbs))
    if not (args.skip_sweep or args.skip_logprob):
        section("logprob sweep", lambda: logprob_sweep(args, timer, copy_gbs))


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    main()
