"""Run the Extract stage in a subprocess, slowly, so a test can kill it mid-run.

python extract_worker.py MODEL_DIR FAMILY CORPUS OUT_DIR SECONDS_PER_BATCH
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from datagen_toys import extract_config

from nla_mcore.datagen.extract import run_extract
from nla_mcore.datagen.providers import HFActivationProvider
from nla_mcore.toy_tokenizers import build_toy_tokenizer


class SlowProvider:
    """The HF provider, sleeping before each batch (the test kills the process meanwhile)."""

    def __init__(self, inner: HFActivationProvider, delay_s: float):
        self.inner, self.delay_s = inner, delay_s
        self.d_model, self.layer = inner.d_model, inner.layer

    def activations(self, batch_token_ids, batch_positions):
        time.sleep(self.delay_s)
        return self.inner.activations(batch_token_ids, batch_positions)


def main(model_dir: str, family: str, corpus: str, out_dir: str, delay_s: str) -> None:
    provider = SlowProvider(HFActivationProvider(model_dir), float(delay_s))
    run_extract(
        extract_config([Path(corpus)]), provider, build_toy_tokenizer(family), out_dir=out_dir
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
