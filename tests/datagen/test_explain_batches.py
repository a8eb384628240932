"""Message Batches mode against the fake server: submit, poll, collect, resume by batch id."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from activation_files import row_texts, write_activations
from fake_anthropic import FakeAnthropic

from nla_mcore.datagen.explain import run_explain
from nla_mcore.datagen.explainers import ExplainError

BATCH_FAULTS = {
    "row-1 ": ["500"],
    "row-2 ": ["400"],
    "row-3 ": ["expired"],
    "row-4 ": ["refusal"],
    "row-5 ": ["no_tags"],
}


def test_batches_end_to_end_with_failures_and_half_price(tmp_path, api_key, fast_cfg):
    """Batches must split at `batch_max_requests`, map results back by custom_id (in any order) to
    the right rows, turn errored/expired results into failed rows, price tokens at half, and leave
    only non-message results uncached so that a re-run resubmits exactly those."""
    src = write_activations(tmp_path / "acts.parquet", row_texts(11) + [""])
    with FakeAnthropic(api_key=api_key, faults=BATCH_FAULTS) as fake:
        cfg = fast_cfg(fake.base_url, use_batches=True, batch_max_requests=4)
        summary = run_explain(cfg, src, tmp_path / "out.parquet")
        assert len(fake.batch_creates()) == 3 and fake.message_requests() == []
        again = run_explain(cfg, src, tmp_path / "again.parquet")
        resubmitted = fake.batch_creates()[3:]

    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["explain_failure"] for r in rows] == [
        None,
        "batch_errored",
        "invalid_request",
        "batch_expired",
        "refusal",
        "no_explanation_tags",
        None,
        None,
        None,
        None,
        None,
        "empty_text",
    ]
    for i in (0, 6, 7, 10):
        assert f'final token is "word{i}"' in rows[i]["explanation"]
    full_price = (
        summary.input_tokens * cfg.price_input_per_mtok
        + summary.output_tokens * cfg.price_output_per_mtok
    ) / 1e6
    assert summary.cost_usd == pytest.approx(full_price / 2)
    assert len(resubmitted) == 1 and len(resubmitted[0].body["requests"]) == 3, (
        "only errored/expired rows go again"
    )
    assert again.failed_by_reason == {"refusal": 1, "no_explanation_tags": 1, "empty_text": 1}


def test_restarted_run_resumes_the_open_batch_instead_of_paying_again(tmp_path, api_key, fast_cfg):
    """A run that stops while its batch is still processing (here: `batch_max_wait_s` runs out) must
    keep the batch id; the next run must collect that batch rather than submit a new one."""
    src = write_activations(tmp_path / "acts.parquet", row_texts(6))
    with FakeAnthropic(api_key=api_key) as fake:
        fake.hold_batches.set()
        cfg = fast_cfg(fake.base_url, use_batches=True, batch_max_wait_s=0.1)
        with pytest.raises(ExplainError, match="still running.*rerun the same command"):
            run_explain(cfg, src, tmp_path / "out.parquet")
        assert not (tmp_path / "out.parquet").exists()
        state = [
            json.loads(line)
            for line in (tmp_path / "cache" / "batches.jsonl").read_text().splitlines()
        ]
        assert [e["event"] for e in state] == ["submitted"] and len(state[0]["keys"]) == 6

        fake.hold_batches.clear()
        summary = run_explain(cfg, src, tmp_path / "out.parquet")
        assert len(fake.batch_creates()) == 1, "the restarted run must not submit a second batch"
    assert summary.ok == 6
    events = [
        json.loads(line)["event"]
        for line in (tmp_path / "cache" / "batches.jsonl").read_text().splitlines()
    ]
    assert events == ["submitted", "collected"]
