"""Conversion at realistic width on GPUs: logits parity (bf16) and the cost of exporting.

Usage (1 or 2 GPUs):  python bench/convert.py [--layers 28]

A Qwen2.5-1.5B-shaped model with random weights (28 layers, d 1536, GQA 12/2, vocab 151936) is
written by transformers as sharded bf16 safetensors, converted to a dist-checkpoint by a TP=1 job
(and by a TP=2 job when 2 GPUs are present), reloaded at TP1 (1 GPU) and TP2 / PP2 (2 GPUs), and
its bf16 logits compared with transformers' fp32 logits on the same GPU; then the checkpoint is
exported back to HF, timed, and its peak host memory (max RSS of the exporting process) reported
next to the model's size.  Parity metric: mean |Δ| / mean |logit| (and the max) against
transformers in fp32.  The yardstick is transformers' own bf16 error against its fp32 logits:
our bf16 model's mean error must be within 2x of it (exits non-zero otherwise).  Top-1 agreement is printed for information only: a
random model's logits are nearly flat, so its argmax flips under any rounding.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.shapes import QWEN25_1P5B, write_random_hf_model  # noqa: E402


def hf_logits(directory: Path, tokens: torch.Tensor, device: str, dtype=torch.bfloat16):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    model = model.to(device)
    with torch.no_grad():
        out = model(tokens.to(device)).logits.float().cpu()
    del model
    return out


def rel_max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


def rel_mean_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().mean() / ref.abs().mean()).item()


def top1(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.argmax(-1) == ref.argmax(-1)).float().mean().item()


def export_child(ckpt: str, out: str, result: str) -> None:
    """Run in a fresh process so its max RSS is the export's alone."""
    from nla_mcore.converters.mcore_to_hf import export_to_hf

    start = time.perf_counter()
    export_to_hf(ckpt, out, max_shard_bytes=2**30)
    seconds = time.perf_counter() - start
    Path(result).write_text(json.dumps({"seconds": seconds, "max_rss_gib": peak_rss_gib()}))


def peak_rss_gib() -> float:
    """This process's peak resident memory.  VmHWM (Linux) belongs to the process image, so it
    starts afresh at exec; getrusage's ru_maxrss would carry over the forking parent's peak."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    parser.add_argument(
        "--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run)"
    )
    parser.add_argument(
        "--export-child", nargs=3, metavar=("CKPT", "OUT", "RESULT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.export_child:
        export_child(*args.export_child)
        return
    from safetensors.torch import load_file, save_file

    from tests.converters.convert_worker import convert_rank, logits_jobs
    from tests.multirank import run_ranks

    dev = args.device
    gpus = torch.cuda.device_count() if dev == "cuda" else 2
    root = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    rows, failures = [], []
    size_gib = write_random_hf_model(root / "hf", args.layers, dev)
    tokens = torch.randint(
        0, QWEN25_1P5B["vocab_size"], (4, 256), generator=torch.Generator().manual_seed(1)
    )
    save_file({"tokens": tokens}, str(root / "tokens.safetensors"))
    reference = hf_logits(root / "hf", tokens, dev, torch.float32)
    hf_bf16 = hf_logits(root / "hf", tokens, dev)
    hf_err = rel_mean_err(hf_bf16, reference)
    rows.append(
        (
            "transformers bf16 vs fp32 (yardstick)",
            f"rel err mean {hf_err:.2e} max {rel_max_err(hf_bf16, reference):.2e}",
            f"top-1 agree {top1(hf_bf16, reference):.4f}",
        )
    )

    saves = [(1, {}, "ckpt_tp1")] + (
        [(2, dict(tensor_parallel=2), "ckpt_tp2")] if gpus >= 2 else []
    )
    for world, parallel, name in saves:
        start = time.perf_counter()
        run_ranks(
            convert_rank, world, str(root / "hf"), str(root / name), parallel, "bfloat16", dev
        )
        rows.append(
            (
                f"hf-to-mcore, {world} rank(s)",
                f"{time.perf_counter() - start:.1f} s (incl. start-up)",
                "",
            )
        )

    loads = [(1, "ckpt_tp1", {}, "tp1")]
    if gpus >= 2:
        loads += [
            (2, "ckpt_tp1", dict(tensor_parallel=2), "tp2"),
            (2, "ckpt_tp2", dict(pipeline_parallel=2), "pp2 (saved tp2)"),
        ]
    for world, ckpt, parallel, label in loads:
        out = root / f"logits_{label.split()[0]}.safetensors"
        run_ranks(
            logits_jobs,
            world,
            [(str(root / ckpt), parallel, str(root / "tokens.safetensors"), str(out), dev)],
        )
        got = load_file(str(out))["logits"]
        err = rel_mean_err(got, reference)
        rows.append(
            (
                f"ours bf16 vs transformers fp32, {label}",
                f"rel err mean {err:.2e} max {rel_max_err(got, reference):.2e}",
                f"top-1 agree {top1(got, reference):.4f}  ({err / hf_err:.2f}x yardstick)",
            )
        )
        if err > 2 * hf_err:
            failures.append(label)

    result = root / "export.json"
    start = time.perf_counter()
    code = subprocess.call(
        [
            sys.executable,
            __file__,
            "--export-child",
            str(root / "ckpt_tp1"),
            str(root / "export"),
            str(result),
        ]
    )
    if code != 0:
        failures.append("export")
    else:
        stats = json.loads(result.read_text())
        rows.append(
            (
                "mcore-to-hf export",
                f"{stats['seconds']:.1f} s ({size_gib / stats['seconds']:.2f} GiB/s)",
                f"max RSS {stats['max_rss_gib']:.2f} GiB for a {size_gib:.2f} GiB model",
            )
        )
        print(f"(whole export process incl. imports: {time.perf_counter() - start:.1f} s)")

    card = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
    print(f"\n{card} x{gpus}, Qwen2.5-1.5B shape ({args.layers} layers), bf16, {size_gib:.2f} GiB")
    for what, a, b in rows:
        print(f"  {what:40} {a:38} {b}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    if failures:
        print(f"FAILED: {failures}")
        sys.exit(1)


if __name__ == "__main__":
    main()
