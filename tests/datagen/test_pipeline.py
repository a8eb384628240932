"""The whole datagen pipeline: a text corpus -> av_sft, ar_sft, rl with the offline explainer."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from datagen_toys import documents, make_toy, one_torch_thread, write_txt_dir
from transformers import AutoTokenizer

from nla_mcore.config import load_config
from nla_mcore.datagen.datagen_config import DatagenConfig
from nla_mcore.datagen.pipeline import main_datagen, run_pipeline
from nla_mcore.datagen.providers import HFActivationProvider
from nla_mcore.sidecar import check_ar_suffix, check_marker, read_dataset_sidecar

SPLITS = ("av_sft", "ar_sft", "rl")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models, shared 2-core machine: one torch thread is faster (see one_torch_thread)."""
    with one_torch_thread():
        yield


def test_text_corpus_to_three_training_files_and_an_idempotent_rerun(tmp_path, capsys):
    """The `make test` end-to-end run: 200 generated documents (one .txt each, some too short)
    go through extract -> split -> explain (offline) -> build. The three files must hold disjoint
    documents, every extracted row must be accounted for (built, or dropped with a reason), the
    sidecars must pass the loaders' checks, and the summary must be written. A second run through
    the CLI entry point must resume everything: no shard redone, every explanation from the
    cache, and the same training files."""
    toy = make_toy("qwen2", tmp_path)
    corpus = write_txt_dir(tmp_path / "corpus", documents(200, seed=31, max_paragraphs=3))
    overrides = [
        f"output_dir={tmp_path / 'out'}",
        f"extract.base_model={toy.model_dir}",
        f"extract.corpus.paths=[{corpus}]",
        "extract.positions_per_doc=3",
        "extract.max_length=128",
        "extract.batch_tokens=2048",
        "extract.rows_per_shard=150",
        "extract.progress=false",
        "split.progress=false",
        "explain.explainer=offline",
        f"explain.cache_dir={tmp_path / 'cache'}",
        "explain.progress=false",
        "build.progress=false",
    ]
    cfg = load_config(DatagenConfig, None, overrides)
    tokenizer = AutoTokenizer.from_pretrained(toy.model_dir)
    summary = run_pipeline(cfg, HFActivationProvider(toy.model_dir), tokenizer)

    extract = summary.extract
    assert extract.complete and extract.stats.docs_read == 200
    assert extract.stats.skipped_docs["too_short"] > 0 and len(extract.shards) == 4
    docs = {}
    for name in SPLITS:
        path = tmp_path / "out" / f"{name}.parquet"
        table = pq.read_table(path)
        docs[name] = set(table.column("doc_id").to_pylist())
        sidecar = read_dataset_sidecar(path)
        assert sidecar.stage == name and sidecar.row_count == table.num_rows > 0
        check_marker(sidecar, tokenizer)
        built = summary.build[name]
        assert built.rows_out + sum(built.dropped.values()) == summary.split.rows[name]
    check_ar_suffix(read_dataset_sidecar(tmp_path / "out" / "ar_sft.parquet"), tokenizer)
    assert not (docs["av_sft"] & docs["ar_sft"] or docs["rl"] & (docs["av_sft"] | docs["ar_sft"]))
    assert sum(summary.split.rows.values()) == extract.stats.rows
    assert set(summary.explain) == {"av_sft", "ar_sft"}  # RL is not explained by default
    report = json.loads((tmp_path / "out" / "datagen-summary.json").read_text())
    assert report["extract"]["rows"] == extract.stats.rows and report["build"]["rl"]["rows_in"] > 0
    assert "datagen summary" in summary.format() and "cost $0.0000" in summary.format()

    first = {name: pq.read_table(tmp_path / "out" / f"{name}.parquet") for name in SPLITS}
    assert main_datagen([*overrides, "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "docs/s in this call" not in printed  # no shard was extracted again
    assert printed.count(", asked 0\n") == 2  # both explained splits came from the cache
    for name in SPLITS:
        assert pq.read_table(tmp_path / "out" / f"{name}.parquet").equals(first[name])


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    """A missing required key must exit 2 with a message naming it (the lead wires this entry
    point into `nla-mcore datagen`)."""
    assert main_datagen([f"output_dir={tmp_path}"]) == 2
    assert "extract.base_model is empty" in capsys.readouterr().err


def test_text_corpus_to_three_files_with_the_anthropic_explainer(tmp_path, api_key):
    """The same pipeline with the real `anthropic` SDK answering through a local server that
    speaks the Messages API (some transient faults injected): every extracted row ends in a built
    file or dropped with a reason, the explain summary counts the API calls, and the key appears
    in no output file."""
    from fake_anthropic import FakeAnthropic

    toy = make_toy("llama", tmp_path)
    corpus = write_txt_dir(tmp_path / "corpus", documents(60, seed=5, max_paragraphs=2))
    with FakeAnthropic(api_key=api_key, faults={"": ["429", "500"]}) as fake:
        overrides = [
            f"output_dir={tmp_path / 'out'}",
            f"extract.base_model={toy.model_dir}",
            f"extract.corpus.paths=[{corpus}]",
            "extract.positions_per_doc=2",
            "extract.max_length=128",
            "extract.progress=false",
            "split.progress=false",
            "explain.explainer=anthropic",
            f"explain.base_url={fake.base_url}",
            f"explain.cache_dir={tmp_path / 'cache'}",
            "explain.backoff_initial_s=0.005",
            "explain.backoff_max_s=0.02",
            "explain.timeout_s=5",
            "explain.progress=false",
            "build.progress=false",
        ]
        cfg = load_config(DatagenConfig, None, overrides)
        tokenizer = AutoTokenizer.from_pretrained(toy.model_dir)
        summary = run_pipeline(cfg, HFActivationProvider(toy.model_dir), tokenizer)
        requests = len(fake.message_requests())
    explained = sum(s.rows for s in summary.explain.values())
    assert requests >= explained > 0  # one call per text, plus retries of the injected faults
    for name in SPLITS:
        path = tmp_path / "out" / f"{name}.parquet"
        built = summary.build[name]
        assert built.rows_out + sum(built.dropped.values()) == summary.split.rows[name]
        assert built.rows_out > 0
        check_marker(read_dataset_sidecar(path), tokenizer)
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert api_key.encode() not in path.read_bytes(), path
