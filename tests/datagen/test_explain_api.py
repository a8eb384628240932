"""The Explain stage through the real `anthropic` SDK against a local fake Messages API."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from activation_files import row_texts, write_activations
from fake_anthropic import FakeAnthropic, passage_of

from nla_mcore.datagen.explain import run_explain
from nla_mcore.datagen.explainers import ExplainError

FAULTS = {
    "row-1 ": ["429", "429"],  # recovers
    "row-2 ": ["500"],  # recovers
    "row-3 ": ["529", "529", "529"],  # recovers on the last retry (max_retries=3)
    "row-4 ": ["timeout"],  # recovers
    "row-5 ": ["malformed"],  # recovers
    "row-6 ": ["refusal"],
    "row-7 ": ["no_tags"],
    "row-8 ": ["truncated"],
    "row-9 ": ["empty"],
    "row-10 ": ["400"],
    "row-11 ": ["500"] * 10,
    "row-12 ": ["529"] * 10,
    "row-13 ": ["429"] * 10,
    "row-14 ": ["malformed"] * 10,
}
EXPECTED_FAILURES = {
    "refusal": 1,
    "no_explanation_tags": 1,
    "truncated": 1,
    "empty_explanation": 1,
    "invalid_request": 1,
    "server_error": 1,
    "overloaded": 1,
    "rate_limited": 1,
    "malformed_response": 1,
    "empty_text": 2,
}
CONTENT_FAILURE_ROWS = {6, 7, 8, 9}  # answers the model gave: cached, never asked again


def _outputs(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _requests_per_row(fake: FakeAnthropic) -> Counter:
    return Counter(passage_of(r.prompt).split()[0] for r in fake.message_requests())


def test_every_fault_ends_ok_or_failed_with_its_reason(tmp_path, api_key, fast_cfg):
    """Each injected fault (429/500/529/timeout/malformed body/refusal/no tags/truncation/400) must end
    as an ok row or a failed row carrying the right reason, with counts in the summary: nothing may
    be dropped or crash the run. Transient faults below the retry limit must recover."""
    texts = row_texts(18) + ["", None]
    src = write_activations(tmp_path / "acts.parquet", texts)
    with FakeAnthropic(api_key=api_key, faults=FAULTS, slow_s=2.5) as fake:
        summary = run_explain(fast_cfg(fake.base_url), src, tmp_path / "out.parquet")
        per_row = _requests_per_row(fake)

    rows = _outputs(tmp_path / "out.parquet")
    assert [r["doc_id"] for r in rows] == [f"doc-{i}" for i in range(20)], "row order must be kept"
    for i, row in enumerate(rows):
        assert row["explain_status"] in ("ok", "failed")
        assert (
            (row["explain_status"] == "ok")
            == (row["explain_failure"] is None)
            == (row["explanation"] is not None)
        )
        if row["explain_status"] == "ok":
            assert (
                f'final token is "word{i}"' in row["explanation"]
                and "<explanation>" not in row["explanation"]
            )
    assert summary.failed_by_reason == EXPECTED_FAILURES
    assert Counter(r["explain_failure"] for r in rows if r["explain_failure"]) == EXPECTED_FAILURES
    assert (summary.rows, summary.ok, summary.failed) == (20, 20 - 11, 11)
    assert per_row["row-1"] == 3 and per_row["row-3"] == 4 and per_row["row-10"] == 1
    assert per_row["row-11"] == 4, "a persistent 5xx is tried max_retries + 1 times"
    assert summary.requests_sent == sum(per_row.values())
    assert summary.input_tokens > 0 and summary.output_tokens > 0 and summary.cost_usd > 0


def test_rerun_asks_again_only_for_transient_failures(tmp_path, api_key, fast_cfg):
    """Transient failures (5xx, 529, 429, malformed, 400) are not cached, so a re-run retries them;
    answers the model gave (refusal, no tags, truncated, empty) are cached and not paid for twice."""
    src = write_activations(tmp_path / "acts.parquet", row_texts(16))
    faults = {
        k: v[:4] for k, v in FAULTS.items() if k != "row-4 "
    }  # persistent faults last one run (4 tries)
    with FakeAnthropic(api_key=api_key, faults=faults) as fake:
        run_explain(fast_cfg(fake.base_url), src, tmp_path / "first.parquet")
        first = len(fake.message_requests())
        second = run_explain(fast_cfg(fake.base_url), src, tmp_path / "second.parquet")
        asked_again = {passage_of(r.prompt).split()[0] for r in fake.message_requests()[first:]}

    assert asked_again == {"row-10", "row-11", "row-12", "row-13", "row-14"}
    assert second.failed_by_reason == {
        "refusal": 1,
        "no_explanation_tags": 1,
        "truncated": 1,
        "empty_explanation": 1,
    }


def test_rerun_is_served_from_cache_with_no_request_and_no_key(
    tmp_path, api_key, fast_cfg, monkeypatch
):
    """A complete re-run must make zero API calls, give identical output, and need no API key at all."""
    src = write_activations(tmp_path / "acts.parquet", row_texts(12))
    with FakeAnthropic(api_key=api_key) as fake:
        run_explain(fast_cfg(fake.base_url), src, tmp_path / "first.parquet")
        assert len(fake.message_requests()) == 12
        monkeypatch.delenv("ANTHROPIC_API_KEY")
        summary = run_explain(fast_cfg(fake.base_url), src, tmp_path / "second.parquet")
        assert len(fake.message_requests()) == 12, "the second run must not call the API"
    assert summary.cache_hits == 12 and summary.requests_sent == 0 and summary.cost_usd == 0
    assert _outputs(tmp_path / "first.parquet") == _outputs(tmp_path / "second.parquet")


def test_another_dataset_sharing_texts_reuses_answers(tmp_path, api_key, fast_cfg):
    """The cache is keyed by content, not by file: a second dataset (other order, duplicates, other
    doc ids) asks only for its new texts, and a text repeated within a file is asked once."""
    texts = row_texts(10)
    other = [
        texts[7],
        "row-100 a new text",
        texts[2],
        texts[2],
        "row-101 another new one",
        texts[9],
    ]
    first = write_activations(tmp_path / "a.parquet", texts)
    second = write_activations(tmp_path / "b.parquet", other)
    with FakeAnthropic(api_key=api_key) as fake:
        run_explain(fast_cfg(fake.base_url), first, tmp_path / "a_out.parquet")
        summary = run_explain(fast_cfg(fake.base_url), second, tmp_path / "b_out.parquet")
        asked = [passage_of(r.prompt) for r in fake.message_requests()[10:]]
    assert sorted(asked) == ["row-100 a new text", "row-101 another new one"]
    assert (summary.unique_texts, summary.cache_hits, summary.ok) == (5, 3, 6)
    by_text = {
        r["detokenized_text_truncated"]: r["explanation"]
        for r in _outputs(tmp_path / "a_out.parquet")
    }
    for row in _outputs(tmp_path / "b_out.parquet"):
        if row["detokenized_text_truncated"] in by_text:
            assert row["explanation"] == by_text[row["detokenized_text_truncated"]]


def test_api_key_is_sent_but_never_logged_or_saved(tmp_path, api_key, fast_cfg, caplog, capfd):
    """The key must reach the server, and appear nowhere else: not in DEBUG logs of any logger
    (SDK and HTTP client included), stdout/stderr, the output parquet, the sidecar or the cache, even
    when the server echoes the credential back in an error message."""
    caplog.set_level(logging.DEBUG)
    src = write_activations(
        tmp_path / "acts.parquet", row_texts(8), sidecar={"kind": "nla_dataset", "stage": "base"}
    )
    faults = {"row-1 ": ["echo_key"] * 10, "row-2 ": ["429"], "row-3 ": ["refusal"]}
    with FakeAnthropic(api_key=api_key, faults=faults) as fake:
        run_explain(fast_cfg(fake.base_url, progress=True), src, tmp_path / "out.parquet")
        sent = [r.headers for r in fake.message_requests()]
    assert all(
        h.get("x-api-key") == api_key or h.get("authorization") == f"Bearer {api_key}" for h in sent
    )

    out, err = capfd.readouterr()
    assert api_key not in caplog.text and api_key not in out and api_key not in err
    assert "[redacted]" in caplog.text, (
        "the echoed credential must have been scrubbed, not dropped silently"
    )
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert api_key.encode() not in path.read_bytes(), f"API key found in {path}"


def test_rejected_key_stops_the_run_with_a_clear_error(tmp_path, api_key, fast_cfg):
    """A 401 would fail every row the same way: the run must stop with a message naming
    ANTHROPIC_API_KEY (and not containing the key), and write no output."""
    src = write_activations(tmp_path / "acts.parquet", row_texts(6))
    with FakeAnthropic(api_key="sk-some-other-key") as fake:
        with pytest.raises(ExplainError, match="ANTHROPIC_API_KEY") as info:
            run_explain(fast_cfg(fake.base_url), src, tmp_path / "out.parquet")
    assert api_key not in str(info.value)
    assert not (tmp_path / "out.parquet").exists()


def test_missing_key_is_refused_before_any_request(tmp_path, fast_cfg, monkeypatch):
    """Without ANTHROPIC_API_KEY the stage must say how to fix it (export it, or use the offline
    explainer) instead of failing inside the SDK."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    src = write_activations(tmp_path / "acts.parquet", row_texts(3))
    with pytest.raises(ExplainError, match="ANTHROPIC_API_KEY is not set.*explainer=offline"):
        run_explain(fast_cfg("http://127.0.0.1:9"), src, tmp_path / "out.parquet")


def test_persistent_timeout_is_a_failed_row(tmp_path, api_key, fast_cfg):
    """A request that keeps timing out must end as a `timeout` failure after its retries, not hang."""
    src = write_activations(tmp_path / "acts.parquet", row_texts(2))
    with FakeAnthropic(api_key=api_key, faults={"row-0 ": ["timeout"] * 3}, slow_s=2.0) as fake:
        summary = run_explain(
            fast_cfg(fake.base_url, timeout_s=0.4, max_retries=1), src, tmp_path / "out.parquet"
        )
    assert summary.failed_by_reason == {"timeout": 1} and summary.ok == 1


def test_cost_limit_stops_before_any_request(tmp_path, api_key, fast_cfg):
    """`max_estimated_cost_usd` must refuse the run before a single paid request is sent."""
    src = write_activations(tmp_path / "acts.parquet", row_texts(5))
    with FakeAnthropic(api_key=api_key) as fake:
        with pytest.raises(ExplainError, match="max_estimated_cost_usd"):
            run_explain(
                fast_cfg(fake.base_url, max_estimated_cost_usd=0.0), src, tmp_path / "out.parquet"
            )
        assert fake.message_requests() == []


def test_request_body_is_what_the_config_says(tmp_path, api_key, fast_cfg):
    """The SDK has no `temperature` argument any more: it must still reach the API when set (as an
    extra body field), and be absent when null, since Sonnet 5+ reject non-default values. Model,
    max_tokens, effort and the prompt with the text in its slot must be sent as configured."""
    src = write_activations(tmp_path / "acts.parquet", row_texts(2))
    with FakeAnthropic(api_key=api_key) as fake:
        run_explain(
            fast_cfg(fake.base_url, temperature=0.3, effort="medium"), src, tmp_path / "a.parquet"
        )
        run_explain(
            fast_cfg(fake.base_url, model="claude-haiku-4-5", max_tokens=300),
            src,
            tmp_path / "b.parquet",
        )
        bodies = [r.body for r in fake.message_requests()]
    with_temperature, without = bodies[:2], bodies[2:]
    assert all(
        b["temperature"] == 0.3 and b["output_config"] == {"effort": "medium"}
        for b in with_temperature
    )
    assert all("temperature" not in b and b["output_config"] == {"effort": "low"} for b in without)
    assert {(b["model"], b["max_tokens"]) for b in without} == {("claude-haiku-4-5", 300)}
    prompts = sorted(passage_of(b["messages"][0]["content"]) for b in with_temperature)
    assert prompts == sorted(row_texts(2)) and all(
        b["messages"][0]["role"] == "user" for b in bodies
    )
