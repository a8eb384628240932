"""The Explain stage without the network: offline explainer, sidecar, bad inputs, config, cache, parsing."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from activation_files import D_MODEL, row_texts, write_activations

from nla_mcore.datagen.explain import load_explain_config, main_explain, run_explain
from nla_mcore.datagen.explain_cache import AnswerCache
from nla_mcore.datagen.explain_config import ExplainConfig
from nla_mcore.datagen.explainers import Answer, parse_explanation

SIDECAR = {
    "kind": "nla_dataset",
    "stage": "base",
    "row_count": 9,
    "extraction": {
        "base_model": "Qwen/Qwen2.5-7B-Instruct",
        "d_model": D_MODEL,
        "layer_index": 3,
        "norm": "none",
    },
    "a_key_this_stage_does_not_know": {"kept": True},
}


def test_offline_end_to_end_keeps_rows_and_carries_the_sidecar(tmp_path, fast_cfg):
    """The quickstart path: no key, no network. Every input column and row order must survive
    (vectors bit-identical across several row groups), explanations must depend on the text, and the
    sidecar must be carried with unknown keys kept and an `api_summaries` block added."""
    texts = row_texts(8) + ["def f(x):\n    return x + 1;"]
    src = write_activations(tmp_path / "acts.parquet", texts, sidecar=SIDECAR)
    summary = run_explain(fast_cfg(explainer="offline"), src, tmp_path / "out.parquet")

    source, out = pq.read_table(src), pq.read_table(tmp_path / "out.parquet")
    assert out.column_names == source.column_names + [
        "explanation",
        "explain_status",
        "explain_failure",
    ]
    assert out.select(source.column_names).equals(source)
    explanations = out.column("explanation").to_pylist()
    assert all(f'"word{i}"' in explanations[i] for i in range(8))
    assert "code or markup" in explanations[8] and len(set(explanations)) == 9
    assert (summary.ok, summary.failed, summary.cost_usd, summary.requests_sent) == (9, 0, 0.0, 0)

    meta = yaml.safe_load((tmp_path / "out.parquet.nla_meta.yaml").read_text())
    assert (
        meta["a_key_this_stage_does_not_know"] == {"kept": True}
        and meta["extraction"] == SIDECAR["extraction"]
    )
    assert meta["api_summaries"]["model"] == "offline-v1"
    assert set(meta["api_summaries"]) >= {
        "model",
        "max_tokens",
        "temperature",
        "instruction_prompt",
    }


def test_offline_explanations_are_deterministic(tmp_path, fast_cfg):
    """Two runs with separate caches must produce identical explanations (tests and the quickstart
    rely on it)."""
    src = write_activations(tmp_path / "acts.parquet", row_texts(5))
    run_explain(
        fast_cfg(explainer="offline", cache_dir=str(tmp_path / "c1")), src, tmp_path / "a.parquet"
    )
    run_explain(
        fast_cfg(explainer="offline", cache_dir=str(tmp_path / "c2")), src, tmp_path / "b.parquet"
    )
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))


def test_bad_inputs_give_errors_that_name_the_problem(tmp_path, fast_cfg):
    """Each bad input must raise an error naming the file or column, never a bare traceback from
    deep inside pyarrow."""
    cfg = fast_cfg(explainer="offline")
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        run_explain(cfg, tmp_path / "nope.parquet", tmp_path / "out.parquet")

    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="junk.parquet is not a readable parquet"):
        run_explain(cfg, tmp_path / "junk.parquet", tmp_path / "out.parquet")

    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "nocol.parquet")
    with pytest.raises(ValueError, match="no column 'detokenized_text_truncated'"):
        run_explain(cfg, tmp_path / "nocol.parquet", tmp_path / "out.parquet")

    pq.write_table(pa.table({"detokenized_text_truncated": [1, 2]}), tmp_path / "int.parquet")
    with pytest.raises(ValueError, match="'detokenized_text_truncated' is int64, expected string"):
        run_explain(cfg, tmp_path / "int.parquet", tmp_path / "out.parquet")

    src = write_activations(tmp_path / "acts.parquet", row_texts(2))
    run_explain(cfg, src, tmp_path / "explained.parquet")
    with pytest.raises(ValueError, match="already has explanation"):
        run_explain(cfg, tmp_path / "explained.parquet", tmp_path / "out.parquet")
    with pytest.raises(ValueError, match="is the input file"):
        run_explain(cfg, src, src)


def test_blank_texts_are_counted_failures_without_a_request(tmp_path, fast_cfg):
    """Null, empty and whitespace-only texts must become `empty_text` failed rows, counted."""
    src = write_activations(tmp_path / "acts.parquet", ["row-0 fine", None, "", "  \n"])
    summary = run_explain(fast_cfg(explainer="offline"), src, tmp_path / "out.parquet")
    assert (
        summary.failed_by_reason == {"empty_text": 3}
        and summary.ok == 1
        and summary.unique_texts == 1
    )


def test_cli_entry_point_reads_yaml_and_overrides(tmp_path, capsys):
    """`main_explain` is what `nla-mcore datagen explain` calls: YAML `explain:` block, dotted
    overrides with or without the `explain.` prefix, exit 0 on success, 2 with a message on error."""
    src = write_activations(tmp_path / "acts.parquet", row_texts(3))
    config = tmp_path / "explain.yaml"
    config.write_text(yaml.safe_dump({"explain": {"explainer": "offline", "concurrency": 4}}))
    argv = [
        "--input",
        str(src),
        "--output",
        str(tmp_path / "out.parquet"),
        "--config",
        str(config),
        f"explain.cache_dir={tmp_path / 'cache'}",
        "progress=false",
    ]
    assert main_explain(argv) == 0
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 3

    assert (
        main_explain(
            [
                "--input",
                str(tmp_path / "missing.parquet"),
                "--output",
                "x.parquet",
                "explainer=offline",
                f"cache_dir={tmp_path / 'cache'}",
            ]
        )
        == 2
    )
    assert "missing.parquet" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("concurrency=0", "explain.concurrency"),
        ("instruction_prompt=no slot here", r"\{text\} exactly once"),
        ("effort=extreme", "explain.effort"),
        ("temperature=1.5", "explain.temperature"),
        ("batch_max_requests=200000", "explain.batch_max_requests"),
        ("no_such_field=1", "no_such_field"),
    ],
)
def test_config_errors_say_what_to_set(override, message):
    """A bad setting must fail at config time with a message naming the field."""
    with pytest.raises(ValueError, match=message):
        load_explain_config(None, [override])


def test_batches_need_the_anthropic_explainer():
    """Batches are an API feature; asking for them offline is a config error, not a silent no-op."""
    with pytest.raises(ValueError, match="use_batches needs explain.explainer=anthropic"):
        ExplainConfig(explainer="offline", use_batches=True)


def test_cache_ignores_a_partial_last_line_and_prefers_ok_records(tmp_path):
    """A writer killed mid-line leaves a partial record; reading must skip (and count) it. When a
    key has a failed and an ok record, the ok one wins."""
    cache = AnswerCache(tmp_path)
    cache.put("k1", Answer(explanation="first"))
    cache.put("k2", Answer.failed("refusal", cacheable=True))
    cache.close()
    later = AnswerCache(tmp_path)
    later.put("k2", Answer(explanation="asked again"))
    later.close()
    shard = sorted(tmp_path.glob("answers-*.jsonl"))[0]
    with open(shard, "a") as fh:
        fh.write(json.dumps({"key": "k3", "explanation": "never finished"})[:20])

    reader = AnswerCache(tmp_path)
    found = reader.lookup({"k1", "k2", "k3"})
    assert found["k1"].explanation == "first" and found["k2"].explanation == "asked again"
    assert "k3" not in found and reader.skipped_lines == 1


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "<explanation>\nA first feature.\nA second one.\n</explanation>",
            ("A first feature.\nA second one.", None),
        ),
        ("Sure! <explanation>  padded  </explanation> trailing", ("padded", None)),
        ("no tags at all", (None, "no_explanation_tags")),
        ("<explanation>unclosed", (None, "no_explanation_tags")),
        ("<explanation> \n </explanation>", (None, "empty_explanation")),
        ("<explanation>a <explanation>b</explanation>", (None, "nested_tags")),
    ],
)
def test_parse_explanation(raw, expected):
    """The stored text is what NLA's DOTALL `<explanation>(.*?)</explanation>` + strip would give."""
    assert parse_explanation(raw) == expected
