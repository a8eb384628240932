"""Fixtures for the Explain stage tests: activation parquets, a secret API key, fast client settings."""

from __future__ import annotations

import secrets

import pytest

from nla_mcore.datagen.explain_config import ExplainConfig


@pytest.fixture
def api_key(monkeypatch) -> str:
    """A fresh, unguessable key in ANTHROPIC_API_KEY, so a leak check cannot match by accident."""
    key = f"sk-ant-test-{secrets.token_hex(16)}"
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    return key


@pytest.fixture
def fast_cfg(tmp_path):
    """ExplainConfig for the fake server: short timeout, millisecond backoff, no progress bar."""

    def make(base_url: str | None = None, **overrides) -> ExplainConfig:
        settings = dict(
            base_url=base_url,
            cache_dir=str(tmp_path / "cache"),
            timeout_s=1.0,
            max_retries=3,
            backoff_initial_s=0.005,
            backoff_max_s=0.02,
            concurrency=8,
            progress=False,
            batch_poll_s=0.02,
        )
        settings.update(overrides)
        return ExplainConfig(**settings)

    return make
