"""Fixtures shared across test packages."""

from __future__ import annotations

import pytest

SFT_PAIR_TRAIN = [
    "optim.lr=3e-3",
    "optim.decay=constant",
    "train.global_batch_size=16",
    "train.micro_batch_size=8",
    "export.enabled=true",
]


@pytest.fixture(scope="session")
def sft_pair(tmp_path_factory):
    """A tiny qwen2 AR (40 steps) and AV (100 steps) trained by the SFT stage on the toy world
    of `tests/train/sft_toys.py` and exported: the starting point of the inference and GRPO
    tests (one spawn, ~25 s, once per session)."""
    from nla_mcore.toy_tokenizers import build_toy_tokenizer
    from tests.converters.convert_worker import make_hf_model
    from tests.multirank import run_ranks
    from tests.train.sft_toys import sft_files
    from tests.train.sft_worker import base_overrides, sft_runs

    root = tmp_path_factory.mktemp("sft_pair")
    model = make_hf_model("qwen2", root / "hf")
    data = sft_files(root / "data", build_toy_tokenizer("qwen2"))
    jobs = [
        (
            "ar",
            [*base_overrides(model, data, root / "ar", "ar"), *SFT_PAIR_TRAIN, "train.steps=40"],
        ),
        (
            "av",
            [*base_overrides(model, data, root / "av", "av"), *SFT_PAIR_TRAIN, "train.steps=100"],
        ),
    ]
    run_ranks(sft_runs, 1, jobs)

    def checkpoint(role):
        return str(sorted((root / role / "checkpoints").glob("step_*"))[-1] / role)

    return dict(
        root=root,
        data=data,
        av=root / "av" / "hf",
        ar=root / "ar" / "hf",
        av_ckpt=checkpoint("av"),
        ar_ckpt=checkpoint("ar"),
    )
