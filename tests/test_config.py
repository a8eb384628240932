"""The config tree: defaults <- YAML <- key=value, errors that name the key, help from docstrings."""

from __future__ import annotations

import pytest

from nla_mcore.config import ConfigError, describe, help_text, load_config, to_yaml
from nla_mcore.quickstart import QuickstartConfig
from nla_mcore.runtime.parallel import LayoutError


def test_defaults_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 5\nparallel:\n  tensor_parallel: 1\n  pipeline_parallel: 2\n")
    cfg = load_config(QuickstartConfig, path, ["steps=7", "family=gemma3"])
    assert (cfg.steps, cfg.family, cfg.lr) == (7, "gemma3", QuickstartConfig().lr)
    assert (cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel) == (1, 2)


def test_saved_yaml_reloads_to_the_same_config(tmp_path):
    cfg = load_config(QuickstartConfig, None, ["steps=3", "parallel.context_parallel=2"])
    path = tmp_path / "saved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(QuickstartConfig, path) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.tensor_paralel=2"], "parallel.tensor_paralel"),
        (["steps=many"], "steps"),
        (["steps"], "key=value"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(QuickstartConfig, None, overrides)


def test_post_init_checks_run():
    with pytest.raises(LayoutError, match="sequence_parallel=true needs"):
        load_config(QuickstartConfig, None, ["parallel.tensor_parallel=1", "parallel.sequence_parallel=true"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(QuickstartConfig, tmp_path / "nope.yaml")


def test_help_lists_nested_keys_with_docs():
    keys = {key: doc for key, _, doc in describe(QuickstartConfig)}
    assert "parallel.sequence_parallel" in keys and "Split activations" in keys["parallel.sequence_parallel"]
    assert "Optimizer steps." in help_text(QuickstartConfig)
