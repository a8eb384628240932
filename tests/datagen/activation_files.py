"""Activation parquets with the real column names and types, for the Explain stage tests."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

D_MODEL = 4


def write_activations(path: Path, texts: list[str | None], *, sidecar: dict | None = None) -> Path:
    """An activation parquet with the real column names and types (d = 4); row i has vector [i]*4."""
    n = len(texts)
    vectors = pa.array([float(i) for i in range(n) for _ in range(D_MODEL)], pa.float32())
    table = pa.table(
        {
            "n_raw_tokens": pa.array([60 + i for i in range(n)], pa.int64()),
            "detokenized_text_truncated": pa.array(texts, pa.string()),
            "activation_vector": pa.FixedSizeListArray.from_arrays(vectors, D_MODEL),
            "activation_layer": pa.array([3] * n, pa.int64()),
            "doc_id": pa.array([f"doc-{i}" for i in range(n)], pa.string()),
            "position": pa.array([50 + i for i in range(n)], pa.int64()),
        }
    )
    pq.write_table(
        table, path, row_group_size=7
    )  # several row groups: the writer must stream them in order
    if sidecar is not None:
        Path(f"{path}.nla_meta.yaml").write_text(yaml.safe_dump(sidecar))
    return path


def row_texts(n: int) -> list[str]:
    """Distinct texts; `row-{i} ` (with the space) is the marker fault schedules match on."""
    return [f"row-{i} Some text about topic {i % 3} that ends with word{i}" for i in range(n)]
