"""A learnable toy world for the SFT tests: explanations that determine their vectors.

Each sample has a topic (of `TOPICS`) and a style (of `STYLES`); its explanation names both in
words, and its vector is `3·u_topic + 2·w_style + noise` for fixed random directions, at a raw
norm of a few tens (an AR must normalise it).  An AR can learn to reconstruct the vector from
the words (FVE well above 0); an AV can learn the words from the vector, and does worse when it
is given another sample's vector.  The training files are made by datagen's own build stage
from an "explained" split, so the SFT readers see exactly what a real run gives them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nla_mcore.datagen.build import build_split
from nla_mcore.datagen.datagen_config import BuildConfig
from nla_mcore.sidecar import (
    DatasetExtraction,
    DatasetSidecar,
    PromptTemplates,
    make_tokens,
    write_dataset_sidecar,
)

TOPICS = ("cats and dogs", "rivers and lakes", "numbers and counting", "music and songs")
STYLES = ("a formal tone", "a playful tone", "a question")
LAYER = 2
D_MODEL = 64


def toy_world(n: int, *, seed: int = 0, d: int = D_MODEL):
    """(explanations, vectors [n, d] float32, topic [n], style [n])."""
    rng = np.random.default_rng(seed)
    topic_dirs = rng.standard_normal((len(TOPICS), d))
    style_dirs = rng.standard_normal((len(STYLES), d))
    topic = np.arange(n) % len(TOPICS)
    style = (np.arange(n) // len(TOPICS)) % len(STYLES)
    vectors = 3 * topic_dirs[topic] + 2 * style_dirs[style] + 0.3 * rng.standard_normal((n, d))
    texts = [
        f"The text is about {TOPICS[t]}. It is written in {STYLES[s]}."
        for t, s in zip(topic, style, strict=True)
    ]
    return texts, vectors.astype(np.float32), topic, style


def write_explained(
    path: Path,
    tokenizer,
    *,
    vectors_ND: np.ndarray,
    explanations: list[str],
    doc_ids: list[str],
    layer: int = LAYER,
    row_group_size: int | None = None,
) -> Path:
    """An Explain-stage output (the real columns) with its sidecar (marker of `tokenizer`)."""
    n, d = vectors_ND.shape
    table = pa.table(
        {
            "n_raw_tokens": pa.array([60] * n, pa.int64()),
            "detokenized_text_truncated": pa.array([f"document {i}" for i in range(n)]),
            "activation_vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors_ND.ravel()), d),
            "activation_layer": pa.array([layer] * n, pa.int64()),
            "doc_id": pa.array(doc_ids),
            "position": pa.array([50] * n, pa.int64()),
            "explanation": pa.array(explanations),
            "explain_status": pa.array(["ok"] * n),
            "explain_failure": pa.array([None] * n, pa.string()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    write_dataset_sidecar(
        path,
        DatasetSidecar(
            stage="base",
            row_count=n,
            extraction=DatasetExtraction(
                base_model="toy", d_model=d, layer_index=layer, positions_per_doc=1
            ),
            tokens=make_tokens(tokenizer),
            prompt_templates=PromptTemplates(),
            api_summaries={
                "model": "toy-world",
                "max_tokens": 0,
                "temperature": None,
                "instruction_prompt": "none",
            },
        ),
    )
    return path


def explained_split(path: Path, tokenizer, n: int, *, seed: int = 0, d: int = D_MODEL) -> Path:
    """The Explain stage's output for the toy world."""
    texts, vectors, _, _ = toy_world(n, seed=seed, d=d)
    return write_explained(
        path,
        tokenizer,
        vectors_ND=vectors,
        explanations=texts,
        doc_ids=[f"doc-{i}" for i in range(n)],
    )


# A short AV prompt keeps CPU steps fast (the canonical one is ~180 tokens).
SHORT_AV_TEMPLATE = "Describe the vector <concept>{injection_char}</concept> in words."


def sft_files(
    directory: Path,
    tokenizer,
    n: int = 96,
    *,
    seed: int = 0,
    d: int = D_MODEL,
    av_template: str = SHORT_AV_TEMPLATE,
) -> dict[str, Path]:
    """{stage: path} of av_sft.parquet and ar_sft.parquet built from the toy world."""
    src = explained_split(directory / "explained.parquet", tokenizer, n, seed=seed, d=d)
    cfg = BuildConfig(progress=False, activation_shuffle_baseline=False, av_template=av_template)
    out = {}
    for stage in ("av_sft", "ar_sft"):
        out[stage] = directory / f"{stage}.parquet"
        build_split(cfg, stage, src, out[stage], tokenizer)
    return out
