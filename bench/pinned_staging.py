"""Why the first async checkpoint stalls: staging GPU tensors into *pinned* host memory.

Usage (one GPU):  python bench/pinned_staging.py [--gib 16] [--json F]

Megatron-Core 0.16.1's async save stages every shard with `tensor.to("cpu", non_blocking=True)`,
which takes pinned memory from PyTorch's caching host allocator.  The first save must create
(and page-lock) all of it; later saves reuse the cached blocks.  This bench times exactly that
copy, for `--gib` of tensors shaped like a 7B-width checkpoint's (bf16 weights, fp32 main
params and Adam moments of 3584 x 18944 / 3584 x 3584 matrices), in a fresh process per
setting (the allocator is configured once per process):

  default          what Megatron-Core does: cudaHostAlloc on the first staging
  register/N       PYTORCH_CUDA_ALLOC_CONF pinned_use_cuda_host_register:True,
                   pinned_num_register_threads:N (malloc, then N threads fault the pages in,
                   then cudaHostRegister), set at run time through the allocator settings
                   before CUDA starts
  register/16-late the same, set after CUDA started and a pinned block was made (where a
                   trainer would set it)
  prewarm          default, but the same pinned blocks are allocated and freed at start-up
                   (the cost moves before training; the staging itself then reuses them)

For each: the first staging (what the first save's step waits for), the second (the cached
case), the start-up cost of prewarm, and the time to fork a child that reads the staged shards
(Megatron-Core's writer is a forked process per save).  Ratios to `default` in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SETTINGS = {
    "default": None,
    "register/8": "pinned_use_cuda_host_register:True,pinned_num_register_threads:8",
    "register/16": "pinned_use_cuda_host_register:True,pinned_num_register_threads:16",
    "register/16-late": "pinned_use_cuda_host_register:True,pinned_num_register_threads:16",
    "prewarm": None,
}


def shard_numels(gib: float) -> list[tuple[int, str]]:
    """(numel, dtype) of tensors summing to ~`gib`, in a 7B-width checkpoint's proportions."""
    mlp, attn = 3584 * 18944, 3584 * 3584
    layer = [(mlp, d) for d in ("bf16", "fp32", "fp32", "fp32") for _ in range(3)]
    layer += [(attn, d) for d in ("bf16", "fp32", "fp32", "fp32") for _ in range(2)]
    size = {"bf16": 2, "fp32": 4}
    out, total = [], 0
    while total < gib * 2**30:
        for numel, dtype in layer:
            out.append((numel, dtype))
            total += numel * size[dtype]
    return out


def child(setting: str, gib: float) -> dict:
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    late = setting.endswith("-late")
    if SETTINGS[setting] and not late:
        torch.cuda.memory._set_allocator_settings(SETTINGS[setting])
    tensors = [torch.ones(n, dtype=dtypes[d], device="cuda") for n, d in shard_numels(gib)]
    torch.cuda.synchronize()
    if late:
        torch.ones(1024, device="cuda").to("cpu", non_blocking=True)
        torch.cuda.synchronize()
        torch.cuda.memory._set_allocator_settings(SETTINGS[setting])
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    result = {"setting": setting, "gib": nbytes / 2**30}
    if setting == "prewarm":
        start = time.perf_counter()
        warm = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        del warm
        result["startup_s"] = time.perf_counter() - start
    for label in ("first_s", "second_s"):
        start = time.perf_counter()
        staged = [t.to("cpu", non_blocking=True) for t in tensors]
        torch.cuda.synchronize()
        result[label] = time.perf_counter() - start
        assert staged[0].is_pinned()
        if label == "second_s":
            result["fork_s"] = fork_and_read(staged)
        del staged
    result["first_gb_s"] = nbytes / result["first_s"] / 1e9
    return result


def fork_and_read(staged) -> float:
    """Seconds to fork a child that reads the staged shards and exits, as Megatron-Core's
    async writer does (a forked process per save).  Pinned anonymous memory (malloc +
    cudaHostRegister) is copied eagerly into a forked child by Linux; cudaHostAlloc's mapping
    is shared."""
    import multiprocessing as mp

    start = time.perf_counter()
    child = mp.get_context("fork").Process(target=_read, args=(staged,))
    child.start()
    child.join()
    assert child.exitcode == 0, child.exitcode
    return time.perf_counter() - start


def _read(staged) -> None:
    sum(float(t[:: 1 << 16].float().sum()) for t in staged)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=16.0, help="bytes staged, GiB")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma list")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.gib)))
        return 0
    rows = []
    for setting in args.settings.split(","):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", setting, "--gib", str(args.gib)],
            capture_output=True,
            text=True,
            env=os.environ,
        )
        if proc.returncode != 0:
            print(f"{setting}: failed\n{proc.stderr[-2000:]}")
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["setting"] == "default"), None)
    print(
        f"\nStaging {rows[0]['gib']:.1f} GiB of checkpoint shards to pinned host memory"
        if rows
        else "no result"
    )
    print(
        f"{'setting':<16} {'first (s)':>10} {'GB/s':>7} {'second (s)':>11} {'start-up (s)':>13}"
        f" {'fork (s)':>9} {'first vs default':>17}"
    )
    for r in rows:
        ratio = f"{base['first_s'] / r['first_s']:.1f}x faster" if base else "-"
        startup = f"{r['startup_s']:.2f}" if "startup_s" in r else "-"
        print(
            f"{r['setting']:<16} {r['first_s']:>10.2f} {r['first_gb_s']:>7.1f} "
            f"{r['second_s']:>11.2f} {startup:>13} {r['fork_s']:>9.2f} {ratio:>17}"
        )
    out = args.json or (
        os.path.join(os.environ["OUT"], "bench-pinned.json") if os.environ.get("OUT") else None
    )
    if out:
        with open(out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
