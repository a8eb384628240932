"""Extraction throughput: the Megatron-Core provider against transformers on the same card.

Usage (one GPU):  python bench/extract.py [--layers 28] [--layer 18] [--docs 256]
Smoke run (CPU):  python bench/extract.py --device cpu --layers 2

A Qwen2.5-1.5B-shaped model with random weights (28 layers, d 1536, 12 query / 2 KV heads, ffn
8960, vocab 151936, tied embeddings) is written by transformers as bf16 safetensors to a temp
directory. The same documents (random token ids, 512-1024 tokens each; 10 positions per document,
9 drawn at index >= 50 and the last token, so every token is forwarded) are cut into the same
length-sorted batches as the Extract stage makes (`extract.length_sorted_batches`, at most
`--batch-tokens` padded tokens and `--batch-docs` documents) and run through three extractors,
one after the other, each with its own model on the card:

  transformers   `model(..., output_hidden_states=True)`, then `hidden_states[K+1]` at the
                 positions: every block, the final norm and the [B, T, vocab] LM head run
                 (the baseline: what a script without early stopping does);
  HF provider    `providers.HFActivationProvider`: a hook on block K stops the forward;
  Megatron-Core  `mcore_provider.MCoreActivationProvider` at TP1: blocks 0..K only, through
                 Megatron-Core's forward-only schedule (backend `auto`, as `nla-mcore datagen`
                 runs it: the local spec where Transformer Engine does not import).

K defaults to 2·L//3 (18 of 28), kept below L-1: transformers' last hidden state has the final
norm applied, so it is no baseline for the last block. The CPU smoke run (float32, 6 short
documents, 2 layers so K = 0) only checks that everything runs and agrees.

tokens/s counts the documents' tokens (not padding) over the wall time of all batches, host
transfers of the vectors included; a warm-up pass over the first two batches comes first (CUDA
context, cuBLAS, Megatron-Core's compiled SwiGLU). Peak memory is `max_memory_allocated` during
an extractor's run, its weights included. "vs transformers" compares the vectors with the
baseline's: mean |diff| / mean |v| (bf16 kernels differ in their rounding, so expect ~1e-2;
a wrong layer or a padding leak gives ~1).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.shapes import QWEN25_1P5B, write_random_hf_model  # noqa: E402

POSITIONS_PER_DOC = 10
MIN_POSITION = 50
GPU_DEFAULTS = dict(docs=256, min_len=512, max_len=1024, dtype="bfloat16")
# CPU bf16 matmuls are slow; the smoke run checks the plumbing, not the speed.
CPU_DEFAULTS = dict(docs=6, min_len=64, max_len=128, dtype="float32")

Batch = tuple[list[list[int]], list[list[int]]]  # (token ids, positions) per document


@dataclass
class Result:
    name: str
    tokens_per_s: float
    peak_gib: float | None
    vectors: list[np.ndarray]


def make_documents(n: int, min_len: int, max_len: int, vocab: int) -> Batch:
    """Random token ids and 10 sorted positions per document (the last token among them)."""
    rng = random.Random(0)
    ids, positions = [], []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        ids.append([rng.randrange(vocab) for _ in range(length)])
        drawn = rng.sample(range(MIN_POSITION, length - 1), POSITIONS_PER_DOC - 1)
        positions.append(sorted(drawn) + [length - 1])
    return ids, positions


def extract_batches(docs: Batch, batch_tokens: int, batch_docs: int) -> list[Batch]:
    """The Extract stage's batches of these documents (longest first)."""
    from nla_mcore.datagen.extract import length_sorted_batches
    from nla_mcore.datagen.positions import PlannedDoc

    planned = [
        PlannedDoc(index=i, doc_id=str(i), token_ids=ids, positions=pos, n_tokens=len(ids))
        for i, (ids, pos) in enumerate(zip(*docs, strict=True))
    ]
    return [
        ([d.token_ids for d in batch], [d.positions for d in batch])
        for batch in length_sorted_batches(planned, batch_tokens, batch_docs)
    ]


def full_forward_extractor(hf_dir: Path, layer: int, device: str, dtype: torch.dtype) -> Callable:
    """The baseline: a full forward with every hidden state, read at block K's output."""
    from transformers import AutoModelForCausalLM

    from nla_mcore.datagen.providers import right_padded

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()

    def extract(ids: list[list[int]], positions: list[list[int]]) -> list[np.ndarray]:
        input_ids_BT, mask_BT = right_padded(ids, torch.device(device))
        with torch.inference_mode():
            out = model(
                input_ids=input_ids_BT,
                attention_mask=mask_BT,
                output_hidden_states=True,
                use_cache=False,
            )
            hidden_BTD = out.hidden_states[layer + 1].float()
            return [hidden_BTD[i, pos].cpu().numpy() for i, pos in enumerate(positions)]

    return extract


def hf_provider_extractor(hf_dir: Path, layer: int, device: str, dtype: torch.dtype) -> Callable:
    from nla_mcore.datagen.providers import HFActivationProvider

    return HFActivationProvider(hf_dir, layer, device=device, dtype=dtype).activations


def mcore_extractor(hf_dir: Path, layer: int, device: str, dtype: torch.dtype) -> Callable:
    """The Megatron-Core provider at TP1 (process group and model-parallel state made earlier)."""
    from nla_mcore.datagen.mcore_provider import MCoreActivationProvider
    from nla_mcore.runtime.parallel import ParallelConfig

    name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    provider = MCoreActivationProvider.from_hf(
        hf_dir, layer=layer, parallel=ParallelConfig(), dtype=name, backend="auto"
    )
    return provider.activations


def measure(name: str, make: Callable[[], Callable], batches: list[Batch], device: str) -> Result:
    """Build the extractor, warm it up on two batches, time all batches; free it."""
    cuda = device == "cuda"
    gc.collect()  # the previous extractor's model
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    extract = make()
    for ids, positions in batches[:2]:
        extract(ids, positions)
    sync(device)
    start = time.perf_counter()
    vectors = []
    for ids, positions in batches:
        vectors += extract(ids, positions)
    sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(len(doc) for ids, _ in batches for doc in ids)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del extract
    return Result(name, tokens / seconds, peak, vectors)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def relative_difference(vectors: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """mean |v - ref| / mean |ref| over every document's vectors."""
    v, ref = np.concatenate(vectors), np.concatenate(reference)
    return float(np.abs(v - ref).mean() / np.abs(ref).mean())


def print_table(results: list[Result], layer: int, layers: int) -> None:
    base = results[0]
    computed = {
        "transformers": f"{layers} + norm + LM head",
        "HF provider": f"{layer + 1}",
        "Megatron-Core": f"{layer + 1}",
    }
    print(
        "\n| extractor | blocks run | tokens/s | vs transformers | peak GiB | vectors vs transformers |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        peak = "-" if r.peak_gib is None else f"{r.peak_gib:.1f}"
        diff = "(reference)" if r is base else f"{relative_difference(r.vectors, base.vectors):.1e}"
        print(
            f"| {r.name} | {computed[r.name]} | {r.tokens_per_s:,.0f} | "
            f"{r.tokens_per_s / base.tokens_per_s:.2f}x | {peak} | {diff} |"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (smoke)")
    parser.add_argument("--layers", type=int, default=28, help="decoder layers of the model")
    parser.add_argument(
        "--layer", type=int, default=None, help="K; default 2*layers//3, at most layers-2"
    )
    parser.add_argument("--docs", type=int, default=None, help="documents (GPU 256, CPU 6)")
    parser.add_argument("--min-len", type=int, default=None, help="shortest document (512; 64)")
    parser.add_argument("--max-len", type=int, default=None, help="longest document (1024; 128)")
    parser.add_argument("--batch-tokens", type=int, default=32768, help="padded tokens per batch")
    parser.add_argument("--batch-docs", type=int, default=64, help="documents per batch")
    parser.add_argument(
        "--dtype", default=None, choices=["bfloat16", "float32"], help="GPU bf16, CPU fp32"
    )
    args = parser.parse_args(argv)
    defaults = GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.layer is None:  # below L-1, where transformers' last hidden state is normed
        args.layer = max(0, min(2 * args.layers // 3, args.layers - 2))
    if not 0 <= args.layer < args.layers - 1:
        parser.error("--layer must be in [0, layers-2]: the baseline reads hidden_states[K+1]")
    if args.min_len <= MIN_POSITION + POSITIONS_PER_DOC:
        parser.error(f"--min-len must exceed {MIN_POSITION + POSITIONS_PER_DOC}")
    return args


def main(argv: list[str] | None = None) -> None:
    from nla_mcore.runtime.distributed import init_distributed, set_seed
    from nla_mcore.runtime.parallel import ParallelConfig, initialize_model_parallel

    args = parse_args(argv)
    # First, before CUDA is touched: a world of one for the Megatron-Core provider.
    init_distributed(args.device)
    initialize_model_parallel(ParallelConfig())
    set_seed(0)
    dtype = getattr(torch, args.dtype)
    docs = make_documents(args.docs, args.min_len, args.max_len, QWEN25_1P5B["vocab_size"])
    batches = extract_batches(docs, args.batch_tokens, args.batch_docs)
    from nla_mcore.models.specs import resolve_backend

    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    tokens = sum(len(ids) for ids in docs[0])
    print(
        f"[extract bench] {card}; Qwen2.5-1.5B shape, {args.layers} layers, K={args.layer}, "
        f"{args.dtype}, Megatron-Core spec {resolve_backend('auto')}; {args.docs} docs, {tokens:,} tokens, {len(batches)} batches "
        f"(<= {args.batch_tokens} padded tokens, <= {args.batch_docs} docs)"
    )
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        hf_dir = Path(tmp) / "hf"
        write_random_hf_model(hf_dir, args.layers, args.device)
        extractors = {
            "transformers": full_forward_extractor,
            "HF provider": hf_provider_extractor,
            "Megatron-Core": mcore_extractor,
        }
        results = [
            measure(
                name,
                lambda make=make: make(hf_dir, args.layer, args.device, dtype),
                batches,
                args.device,
            )
            for name, make in extractors.items()
        ]
    print_table(results, args.layer, args.layers)


if __name__ == "__main__":
    main()
