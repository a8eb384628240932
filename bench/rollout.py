"""Rollouts: the native engine against transformers' `generate` and the roofline, same run.

Usage (one GPU):  python bench/rollout.py [--shapes qwen7b] [--batches 64,512] [--json F]
Smoke run (CPU):  python bench/rollout.py --smoke

Setup (the engine issue's): random bf16 weights of the shape, prompts of `--prompt` (250)
tokens with one injected vector each (marker and its neighbours at ~80 % of the prompt),
`--new` (150) new tokens, forced: no stop ids, so every sample runs to the cap; sampling on
(temperature 1.0, top-p 0.95).  Batch B prompts with n = 1.

  ours          `NativeEngine.generate` on the Megatron-Core model (local spec, TP1), wall
                time around the call (it ends with the tokens on the host).
  transformers  `generate(inputs_embeds=..., do_sample=True, min_new_tokens=new)` with SDPA
                in bf16, the vector spliced at the marker; wall time.
  roofline      prefill FLOPs over the GEMM rate measured in this run, plus, for every decode
                step, the larger of (weights + the KV cache read) over the copy bandwidth
                measured in this run and the step's FLOPs over the GEMM rate.

FLOPs: 2 x matmul parameters (the LM head included) per token, plus attention 4 x L x heads x
head_dim x (keys seen) per token.  Bytes per decode step: every weight once (bf16) plus K and
V of every layer up to the current length.  Columns: wall seconds, new tokens/s, ours' ratio
to transformers, the roofline's share of ours' time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.shapes import QWEN25_7B_WIDTH, write_random_hf_model  # noqa: E402

SHAPES = {"qwen7b": (QWEN25_7B_WIDTH, 28)}
SMOKE_SHAPE = dict(
    QWEN25_7B_WIDTH,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@dataclass
class Row:
    shape: str
    batch: int
    impl: str
    wall_s: float | None = None
    new_tokens_per_s: float | None = None
    prefill_s: float | None = None
    decode_s: float | None = None
    peak_gib: float | None = None
    vs_transformers: float | None = None
    roofline_share: float | None = None
    error: str | None = None


def prompt_batch(vocab: int, batch: int, length: int, seed: int = 0):
    """(tokens [B, S] with a marker and its neighbours, Tokens) from random ids."""
    from nla_mcore.sidecar import Tokens

    gen = torch.Generator().manual_seed(seed)
    marker, left, right = vocab - 3, vocab - 2, vocab - 1
    tokens = torch.randint(0, vocab - 3, (batch, length), generator=gen)
    pos = int(length * 0.8)
    tokens[:, pos - 1], tokens[:, pos], tokens[:, pos + 1] = left, marker, right
    meta = Tokens(
        injection_char="x",
        injection_token_id=marker,
        injection_left_neighbor_id=left,
        injection_right_neighbor_id=right,
    )
    return tokens, meta, pos


def matmul_params(hf) -> int:
    d, layers = hf.hidden_size, hf.num_layers
    attn = d * hf.head_dim * (hf.num_attention_heads * 2 + hf.num_key_value_heads * 2)
    mlp = 3 * d * hf.intermediate_size
    return layers * (attn + mlp) + hf.vocab_size * d


def roofline_s(hf, batch: int, prompt: int, new: int, gemm_tflops: float, copy_gbs: float):
    """(prefill seconds, decode seconds) at the measured rates."""
    flops_token = 2 * matmul_params(hf)
    attn_unit = 4 * hf.num_layers * hf.num_attention_heads * hf.head_dim
    prefill_flops = batch * (prompt * flops_token + attn_unit * prompt * (prompt + 1) / 2)
    prefill = prefill_flops / (gemm_tflops * 1e12)
    weight_bytes = 2 * matmul_params(hf)  # the embedding: only B rows a step
    kv_unit = 2 * 2 * hf.num_layers * hf.num_key_value_heads * hf.head_dim  # K and V, bf16
    decode = 0.0
    for t in range(new - 1):
        seen = prompt + t + 1
        step_bytes = weight_bytes + batch * seen * kv_unit
        step_flops = batch * (flops_token + attn_unit * seen)
        decode += max(step_bytes / (copy_gbs * 1e9), step_flops / (gemm_tflops * 1e12))
    return prefill, decode


def measured_rates() -> tuple[float, float]:
    """(bf16 GEMM TFLOP/s at 8192^3, device copy GB/s over 2 GiB), both in this run."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)

    def timed(fn, reps=10) -> float:
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / reps

    gemm = 2 * 8192**3 / timed(lambda: a @ b) / 1e12
    copy = 2 * src.numel() * src.element_size() / timed(lambda: dst.copy_(src)) / 1e9
    return gemm, copy


def run_ours(hf_dir: Path, tokens, meta, vectors, args, device) -> Row:
    from nla_mcore.models.build import make_recipe
    from nla_mcore.models.hf_config import load_hf_config
    from nla_mcore.models.injection import inject
    from nla_mcore.models.nla import build_av
    from nla_mcore.rl.rollout import NativeEngine, SamplingParams
    from nla_mcore.runtime.parallel import ParallelConfig

    hf = load_hf_config(hf_dir)
    dtype = "float32" if args.smoke else "bfloat16"
    recipe = make_recipe(hf, ParallelConfig(), dtype=dtype, backend="local")
    model = build_av(recipe, hf_dir=hf_dir)
    engine = NativeEngine(model, vocab_size=hf.vocab_size)
    params = SamplingParams(max_new_tokens=args.new, temperature=1.0, top_p=0.95, seed=0)
    virtual, table = inject(
        tokens, vectors, tokens=meta, vocab_size=hf.vocab_size, injection_scale=150.0
    )
    engine.generate(virtual[:1], table[:1], SamplingParams(max_new_tokens=2, temperature=0))
    _sync(device)
    started = time.perf_counter()
    out = engine.generate(virtual, table, params)
    _sync(device)
    wall = time.perf_counter() - started
    assert int(out.lengths_N.min()) == args.new, "forced generation stopped early"
    row = Row(
        "",
        len(tokens),
        "ours",
        wall_s=wall,
        prefill_s=out.stats["prefill_s"],
        decode_s=out.stats["decode_s"],
        peak_gib=out.stats.get("peak_memory_bytes", 0) / 2**30 or None,
    )
    del engine, model
    return row


def run_transformers(hf_dir: Path, tokens, pos, vectors, args, device) -> Row:
    import transformers

    from nla_mcore.prompts import normalize

    dtype = torch.float32 if args.smoke else torch.bfloat16
    model = (
        transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=dtype, attn_implementation="sdpa"
        )
        .to(device)
        .eval()
    )
    tokens = tokens.to(device)

    def generate(new: int, model=model):
        with torch.no_grad():
            embeds = model.get_input_embeddings()(tokens).clone()
            embeds[:, pos] = normalize(vectors.float().to(device), 150.0).to(dtype)
            return model.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones_like(tokens),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=True,
                temperature=1.0,
                top_p=0.95,
                top_k=None,
                pad_token_id=0,
            )

    generate(2)  # warm-up, as ours gets
    _sync(device)
    started = time.perf_counter()
    out = generate(args.new)
    _sync(device)
    wall = time.perf_counter() - started
    assert out.shape[1] == args.new
    del model
    return Row("", len(tokens), "transformers", wall_s=wall)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen7b", help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--layers", type=int, default=None, help="layers (default: the model's)")
    parser.add_argument("--batches", default="64,512")
    parser.add_argument("--prompt", type=int, default=250)
    parser.add_argument("--new", type=int, default=150)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, fp32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.smoke:
        args.batches, args.prompt, args.new = "2", 24, 4
    device = torch.device("cpu" if args.smoke else "cuda")
    from nla_mcore.runtime.distributed import init_distributed
    from nla_mcore.runtime.parallel import ParallelConfig, initialize_model_parallel

    init_distributed(device.type)
    initialize_model_parallel(ParallelConfig())
    gemm, copy = (1.0, 1.0) if args.smoke else measured_rates()
    print(f"[bench-rollout] GEMM {gemm:.0f} TFLOP/s, copy {copy:.0f} GB/s (this run)")
    rows: list[Row] = []
    for name in args.shapes.split(","):
        shape, layers = (SMOKE_SHAPE, 2) if args.smoke else SHAPES[name]
        layers = args.layers or layers
        with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
            hf_dir = Path(tmp) / "hf"
            write_random_hf_model(hf_dir, layers, device.type, shape=shape)
            from nla_mcore.models.hf_config import load_hf_config

            hf = load_hf_config(hf_dir)
            for batch in (int(b) for b in args.batches.split(",")):
                tokens, meta, pos = prompt_batch(hf.vocab_size, batch, args.prompt)
                vectors = torch.randn(batch, hf.hidden_size)
                pre, dec = roofline_s(hf, batch, args.prompt, args.new, gemm, copy)
                found = {}
                for impl, fn in (("ours", run_ours), ("transformers", run_transformers)):
                    try:
                        if impl == "ours":
                            row = fn(hf_dir, tokens, meta, vectors, args, device)
                        else:
                            row = fn(hf_dir, tokens, pos, vectors, args, device)
                    except Exception as err:  # report it, keep the table
                        row = Row("", batch, impl, error=f"{type(err).__name__}: {err}"[:300])
                    row.shape = name
                    if row.wall_s:
                        row.new_tokens_per_s = batch * args.new / row.wall_s
                    found[impl] = row
                    rows.append(row)
                    print(
                        f"[bench-rollout] {name} batch {batch} {impl}: "
                        f"{row.error or f'{row.wall_s:.2f} s'}",
                        flush=True,
                    )
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                ours, theirs = found["ours"], found["transformers"]
                if ours.wall_s and theirs.wall_s:
                    ours.vs_transformers = theirs.wall_s / ours.wall_s
                if ours.wall_s:
                    ours.roofline_share = (pre + dec) / ours.wall_s
                rows.append(
                    Row(name, batch, "roofline", wall_s=pre + dec, prefill_s=pre, decode_s=dec)
                )
    print(
        f"{'shape':<8} {'batch':>5} {'impl':<13} {'wall s':>8} {'new tok/s':>10} "
        f"{'prefill':>8} {'decode':>8} {'x transf.':>9} {'roofline':>9}"
    )
    for r in rows:

        def f(v, spec):
            return "-" if v is None else format(v, spec)

        print(
            f"{r.shape:<8} {r.batch:>5} {r.impl:<13} {f(r.wall_s, '.2f'):>8} "
            f"{f(r.new_tokens_per_s, ',.0f'):>10} {f(r.prefill_s, '.2f'):>8} "
            f"{f(r.decode_s, '.2f'):>8} {f(r.vs_transformers, '.2f'):>9} "
            f"{f(r.roofline_share, '.0%'):>9}" + (f"  {r.error}" if r.error else "")
        )
    out = args.json or (
        os.path.join(os.environ["OUT"], "bench-rollout.json") if os.environ.get("OUT") else None
    )
    if out:
        Path(out).write_text(
            json.dumps(
                dict(
                    command=" ".join(sys.argv),
                    gemm_tflops=gemm,
                    copy_gbs=copy,
                    rows=[asdict(r) for r in rows],
                ),
                indent=1,
            )
        )
    return 0 if not any(r.error for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
