"""`NLAClient` / `NLACritic` on a GPU in bf16 (their default there), against fp32 on the CPU.

Why: the CPU tests prove the client and critic exact in fp32; users run them on a GPU, where
`device="auto"` picks CUDA and bf16.  The released-layout fixture (gemma3: the √d embedding,
a BOS) is loaded both ways; the prompt's next-token logits and the AR predictions must agree
within bf16 rounding (relative mean error ≤ 2e-2; a lost scale or a wrong position is O(1)),
and `nla-mcore explain` must run end to end on the GPU.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nla_mcore.cli import main as cli_main
from nla_mcore.inference import NLAClient, NLACritic
from tests.inference.released_layout import released_pair

pytestmark = pytest.mark.gpu


def rel_err(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).mean() / np.abs(ref).mean())


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return released_pair(tmp_path_factory.mktemp("released_gpu"), "gemma3", "v2")


def test_client_on_gpu_matches_cpu(dirs):
    gpu = NLAClient(dirs["av"])  # auto: CUDA, bf16
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    cpu = NLAClient(dirs["av"], device="cpu")
    vectors = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 5
    with torch.no_grad():
        got = gpu.model(inputs_embeds=gpu.prompt_embeddings(vectors)).logits[:, -1].float().cpu()
        want = cpu.model(inputs_embeds=cpu.prompt_embeddings(vectors)).logits[:, -1]
    assert rel_err(got, want) <= 2e-2
    explanations = gpu.explain(vectors.numpy(), max_new_tokens=8, temperature=0.7, seed=1)
    assert all(len(e.token_ids) >= 1 for e in explanations)


def test_critic_on_gpu_matches_cpu(dirs):
    texts = ["The cat sat on the mat.", "A list of three items, in a formal tone.", "x"]
    got = NLACritic(dirs["ar"]).reconstruct(texts)
    want = NLACritic(dirs["ar"], device="cpu").reconstruct(texts)
    assert rel_err(got, want) <= 2e-2


def test_explain_runs_on_gpu(dirs, tmp_path, capsys):
    vectors = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    parquet = tmp_path / "vectors.parquet"
    pq.write_table(
        pa.table(
            {
                "activation_vector": pa.FixedSizeListArray.from_arrays(
                    pa.array(vectors.ravel()), 64
                ),
                "doc_id": [f"d{i}" for i in range(5)],
            }
        ),
        parquet,
    )
    out = tmp_path / "t"
    code = cli_main(
        [
            "explain",
            "--av",
            str(dirs["av"]),
            "--ar",
            str(dirs["ar"]),
            "--parquet",
            str(parquet),
            "--rows",
            "all",
            "--out",
            str(out),
            "--max-new-tokens",
            "8",
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr()
    records = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in records] == [f"d{i}" for i in range(5)]
