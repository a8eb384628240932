"""Layout validation: every impossible layout is refused before any process group exists,
with a message that names the value to change."""

from __future__ import annotations

import pytest

from nla_mcore.runtime.parallel import LayoutError, ParallelConfig, validate_layout

MODEL = dict(num_attention_heads=4, num_query_groups=2, num_layers=4, vocab_size=1536)


def check(parallel, world_size, **overrides):
    return validate_layout(parallel, world_size=world_size, **{**MODEL, **overrides})


def test_valid_layout_returns_data_parallel_size():
    assert check(ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 8, seq_length=64) == 2


@pytest.mark.parametrize(
    "parallel, world, overrides, expected",
    [
        (
            ParallelConfig(tensor_parallel=8),
            8,
            {},
            "num_attention_heads=4 is not divisible by tensor_parallel=8",
        ),
        (
            ParallelConfig(tensor_parallel=4),
            4,
            {},
            "num_key_value_heads=2 is not divisible by tensor_parallel=4",
        ),
        (
            ParallelConfig(pipeline_parallel=3),
            3,
            {},
            "num_layers=4 is not divisible by pipeline_parallel=3",
        ),
        (
            ParallelConfig(tensor_parallel=2),
            2,
            {"vocab_size": 1537},
            "vocab_size=1537 is not divisible by tensor_parallel=2",
        ),
        (
            ParallelConfig(context_parallel=2),
            2,
            {"seq_length": 30},
            "not divisible by 4 (2·context_parallel=4)",
        ),
        (
            ParallelConfig(tensor_parallel=2, sequence_parallel=True),
            2,
            {"seq_length": 33},
            "tensor_parallel=2 (sequence parallel)",
        ),
        (
            ParallelConfig(tensor_parallel=2, context_parallel=2, sequence_parallel=True),
            4,
            {"seq_length": 36},
            "pad sequences to a multiple of 8",
        ),
        (ParallelConfig(tensor_parallel=2), 3, {}, "world size 3 is not divisible by tp·pp·cp"),
    ],
)
def test_invalid_layouts_name_the_problem(parallel, world, overrides, expected):
    with pytest.raises(LayoutError) as err:
        check(parallel, world, **overrides)
    assert expected in str(err.value)


def test_all_problems_reported_at_once():
    """A user fixing a layout should see every conflict in one run, not one per attempt."""
    with pytest.raises(LayoutError) as err:
        check(ParallelConfig(tensor_parallel=8, pipeline_parallel=3), 24)
    message = str(err.value)
    assert "num_attention_heads" in message and "num_layers=4" in message


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(sequence_parallel=True), "sequence_parallel=true needs parallel.tensor_parallel > 1"),
        (dict(context_parallel=0), "parallel.context_parallel must be >= 1"),
    ],
)
def test_config_checks(kwargs, expected):
    with pytest.raises(LayoutError, match=expected):
        ParallelConfig(**kwargs)
