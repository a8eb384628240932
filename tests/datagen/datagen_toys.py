"""Toy models, corpora and configs for the datagen pipeline tests (extract, split, build).

A toy model is a tiny random Hugging Face model of a family (toy_hf_config: 4 blocks, d=64),
seeded and saved to disk with the family's toy tokenizer, so a subprocess can load the very same
weights. Documents are made by joining toy_corpus() paragraphs with a seeded RNG: lengths range
from ~20 to ~400 tokens, so some are too short for a position >= 50 and some are long.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import transformers

from nla_mcore.datagen.datagen_config import CorpusConfig, ExtractConfig
from nla_mcore.datagen.providers import HFActivationProvider
from nla_mcore.toy import toy_corpus, toy_hf_config
from nla_mcore.toy_tokenizers import build_toy_tokenizer, save_toy_tokenizer


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread, then restore: a d=64 model gains nothing from more, and on a
    shared 2-core machine two spinning OpenMP threads made these tests 2-3x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Toy:
    family: str
    model_dir: Path
    model: torch.nn.Module
    tokenizer: Any

    def provider(self, layer: int | None = None) -> HFActivationProvider:
        return HFActivationProvider(self.model, layer)


def make_toy(family: str, directory: Path) -> Toy:
    """A seeded random toy model of `family`, saved (weights + tokenizer) under `directory`."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**toy_hf_config(family))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model_dir = directory / f"toy-{family}"
    model.save_pretrained(model_dir)
    save_toy_tokenizer(family, model_dir)
    return Toy(family, model_dir, model, build_toy_tokenizer(family))


def documents(n: int, seed: int = 0, max_paragraphs: int = 6) -> list[str]:
    """`n` deterministic documents of 1..max_paragraphs toy paragraphs each."""
    paragraphs = toy_corpus()
    rng = random.Random(seed)
    return [
        "\n\n".join(rng.choice(paragraphs) for _ in range(rng.randint(1, max_paragraphs)))
        for _ in range(n)
    ]


def write_jsonl(path: Path, texts: list[str], ids: list[str] | None = None) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            record = {"text": text} if ids is None else {"id": ids[i], "text": text}
            fh.write(json.dumps(record) + "\n")
    return path


def write_txt_dir(directory: Path, texts: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (directory / f"doc{i:04d}.txt").write_text(text, encoding="utf-8")
    return directory


def extract_config(paths: list[str | Path], **overrides: Any) -> ExtractConfig:
    """Small, quiet settings: 4 positions per doc, 8 docs per shard, 160 tokens at most."""
    corpus = overrides.pop("corpus", None) or CorpusConfig(paths=[str(p) for p in paths])
    settings = dict(
        corpus=corpus,
        base_model="toy",
        positions_per_doc=4,
        rows_per_shard=32,
        max_length=160,
        batch_tokens=640,
        batch_docs=4,
        progress=False,
    )
    settings.update(overrides)
    return ExtractConfig(**settings)


def rows_of(paths: list[str | Path]) -> dict[tuple[str, int], dict[str, Any]]:
    """{(doc_id, position): row} over parquet files (vectors as float32 arrays)."""
    rows = {}
    for path in paths:
        for row in pq.read_table(path).to_pylist():
            row["activation_vector"] = np.asarray(row["activation_vector"], np.float32)
            rows[(row["doc_id"], row["position"])] = row
    return rows
