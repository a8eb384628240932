"""A tiny AV and AR trained here by the SFT stage and exported give, through `NLAClient` and
`NLACritic` (transformers only), what the Megatron-Core side gives from the checkpoints they
were exported from; and `nla-mcore explain` writes a readable, scored transcript of them.

The two sides share nothing but the files: Megatron-Core injects through a virtual token id
and decodes greedily by recomputing the sequence (`megatron_reference.py`); the client splices
`inputs_embeds` and calls `generate` (KV cache).  fp32 on the CPU: the greedy tokens must be the
same and the AR predictions equal to 1e-5 (a wrong position, a lost scale or a missing layer
moves them by O(1)).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nla_mcore.cli import main as cli_main
from nla_mcore.eval.scores import cosine, fve, mse_nrm
from nla_mcore.inference.client import NLAClient
from nla_mcore.inference.critic import NLACritic
from nla_mcore.prompts import ar_prompt_ids
from tests.inference.megatron_reference import ar_predictions, greedy_explanations
from tests.multirank import run_ranks
from tests.train.sft_toys import TOPICS, toy_world

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(sft_pair):
    return sft_pair


def explain(trained, parquet, *flags) -> int:
    """`nla-mcore explain` with the trained AV and AR on `parquet`."""
    return cli_main(
        [
            "explain",
            "--av",
            str(trained["av"]),
            "--ar",
            str(trained["ar"]),
            "--parquet",
            str(parquet),
            *flags,
        ]
    )


def test_client_greedy_matches_megatron(trained):
    texts, vectors_ND, topic, _ = toy_world(96)
    picked = [0, 1, 2, 3, 13, 50, 77, 95]
    client = NLAClient(trained["av"], device="cpu")
    got = client.explain(vectors_ND[picked], max_new_tokens=40, batch_size=3)
    want, want_logits_BV = run_ranks(
        greedy_explanations,
        1,
        trained["av_ckpt"],
        client.prompt_ids,
        torch.from_numpy(vectors_ND[picked]),
        client.dir.sidecar.tokens,
        client.injection_scale,
        client.stop_ids,
        40,
    )[0]
    assert [list(e.token_ids) for e in got] == want
    # the argmax hides small errors (a 1.5x injection scale keeps these tokens): the logits
    with torch.no_grad():
        embeds = client.prompt_embeddings(torch.from_numpy(vectors_ND[picked]))
        logits_BV = client.model(inputs_embeds=embeds).logits[:, -1].numpy()
    np.testing.assert_allclose(logits_BV, want_logits_BV, atol=1e-4, rtol=1e-4)
    # and the AV did learn to read the vector: it names each sample's topic
    assert all(e.finished and e.text is not None for e in got), got
    named = [TOPICS[topic[i]] in e.text for i, e in zip(picked, got, strict=True)]
    assert sum(named) >= 6, [e.text for e in got]


def test_critic_matches_megatron_and_scores_the_same(trained):
    texts, vectors_ND, _, _ = toy_world(96)
    texts, vectors_ND = texts[:24], vectors_ND[:24]
    critic = NLACritic(trained["ar"], device="cpu")
    rows = [ar_prompt_ids(critic.dir.tokenizer, t, critic.template) for t in texts]
    want_ND = run_ranks(ar_predictions, 1, trained["ar_ckpt"], rows, critic.extraction_layer)[0]
    got_ND = critic.reconstruct(texts, batch_size=5)  # other paddings than the reference's
    np.testing.assert_allclose(got_ND, want_ND, atol=1e-5, rtol=1e-5)
    scores = critic.score(texts, vectors_ND)
    scale = critic.mse_scale
    np.testing.assert_allclose(scores.mse_nrm_N, mse_nrm(want_ND, vectors_ND, scale), atol=1e-5)
    np.testing.assert_allclose(scores.cos_N, cosine(want_ND, vectors_ND), atol=1e-6)
    assert scores.fve == pytest.approx(fve(float(scores.mse_nrm_N.mean()), vectors_ND, scale))
    assert scores.fve > 0.3 and scores.baseline == "rawvar"  # it learned (FVE < 0 at step 0)


def test_explain_writes_a_scored_transcript(trained, tmp_path, capsys):
    out = tmp_path / "transcript"
    code = explain(
        trained,
        trained["data"]["av_sft"],
        "--rows",
        "0:6",
        "--out",
        str(out),
        "--max-new-tokens",
        "40",
        "--quiet",
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "6 of 6 explanations parsed" in printed and "FVE" in printed, printed
    assert "the reference explanations: mean cos" in printed, printed
    records = [
        json.loads(line) for line in (tmp_path / "transcript.jsonl").read_text().splitlines()
    ]
    assert [r["row"] for r in records] == list(range(6))
    for r in records:
        assert r["explanation"] and r["reference"] and r["doc_id"]
        assert -1 <= r["cos"] <= 1 and 0 <= r["mse_nrm"] <= 4 and -1 <= r["reference_cos"] <= 1
    md = (tmp_path / "transcript.md").read_text()
    assert md.count("## Row ") == 6 and "**Explanation:**" in md and "Reference explanation" in md
    summary = next(line for line in md.splitlines() if line.startswith("- **Summary:**"))
    assert "FVE" in summary and "6 of 6" in summary, summary
    assert not list(tmp_path.glob(".*tmp*")), "no temporary files are left"


def test_explain_refuses_bad_input_before_loading_models(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default outputs would go
    av = str(trained["av"])
    parquet = str(trained["data"]["av_sft"])
    assert cli_main(["explain", "--av", av, "--parquet", parquet, "--rows", "90:200"]) == 2
    assert "the file has 96 rows (0:96)" in capsys.readouterr().err
    assert cli_main(["explain", "--av", av, "--parquet", parquet, "--rows", "1,x"]) == 2
    assert "expected all, a:b or 3,5,9" in capsys.readouterr().err
    nan_file = tmp_path / "nan.parquet"
    vectors = np.ones((3, 64), np.float32)
    vectors[1, 5] = np.nan
    pq.write_table(
        pa.table(
            {"activation_vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 64)}
        ),
        nan_file,
    )
    assert cli_main(["explain", "--av", av, "--parquet", str(nan_file), "--rows", "all"]) == 2
    assert "row 1: the activation vector is NaN" in capsys.readouterr().err
    assert cli_main(["explain", "--av", av, "--parquet", str(tmp_path / "none.parquet")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not list(tmp_path.glob("explain*")), "nothing is written for a refused run"


def test_explain_refuses_vectors_of_another_layer(trained, tmp_path, capsys):
    """The parquet's sidecar says layer 3; the AV and AR read layer 2: fluent nonsense."""
    import shutil

    import yaml

    src = trained["data"]["ar_sft"]
    parquet = tmp_path / src.name
    shutil.copy(src, parquet)
    sidecar = yaml.safe_load(src.with_name(src.name + ".nla_meta.yaml").read_text())
    sidecar["extraction"]["layer_index"] = 3
    parquet.with_name(parquet.name + ".nla_meta.yaml").write_text(yaml.safe_dump(sidecar))
    code = explain(trained, parquet, "--rows", "0:2", "--out", str(tmp_path / "x"))
    assert code == 2
    assert "disagree on the layer" in capsys.readouterr().err
