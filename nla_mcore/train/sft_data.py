"""The data side of an SFT run: read, check against the model, tokenise, hold out, batch.

Every rank builds the same `SFTData` from the same files (the checks are deterministic, so a
bad file fails on every rank at once, before any collective).  A step's micro-batches are a
pure function of (seed, step, dp): `plan(step)` gives every DP rank's share, so all ranks agree
on the token counts without communicating.

Held-out evaluation: a separate file, or the documents whose `sha256(doc_id)` falls in the
lowest `eval_fraction` of the hash space (no document is in both splits; reproducible without
a stored list), capped at `eval_max_samples`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import numpy as np

from nla_mcore.data.batching import (
    MicroBatchPlan,
    global_batch,
    plan_evaluation,
    plan_microbatches,
)
from nla_mcore.data.sft_files import DataError, SFTRows, check_against_model, read_sft_file
from nla_mcore.data.sft_tokenize import TokenizedSFT, tokenize_ar, tokenize_av

log = logging.getLogger(__name__)

_HASH_SPACE = 2**32


@dataclass
class SFTData:
    """Tokenised training and evaluation sets and the batching of one run."""

    stage: str
    train: TokenizedSFT
    eval: TokenizedSFT | None
    rows: SFTRows
    global_batch_size: int
    micro_batch_size: int
    seed: int
    dp: int
    pad_multiple: int
    pad_id: int

    def plan(self, step: int) -> list[MicroBatchPlan]:
        """Every DP rank's micro-batches of update number `step` (1-based)."""
        indices = global_batch(
            len(self.train),
            seed=self.seed,
            step=step - 1,
            global_batch_size=self.global_batch_size,
        )
        return plan_microbatches(
            indices,
            self.train.lengths_N,
            dp=self.dp,
            micro_batch_size=self.micro_batch_size,
            pad_multiple=self.pad_multiple,
        )

    def eval_plan(self) -> list[MicroBatchPlan]:
        return plan_evaluation(
            self.eval.lengths_N,
            dp=self.dp,
            micro_batch_size=self.micro_batch_size,
            pad_multiple=self.pad_multiple,
        )

    def steps_for(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * len(self.train) / self.global_batch_size))

    def state(self, step: int) -> dict:
        """What a checkpoint records about the data after `step` updates."""
        return {
            "consumed_samples": step * self.global_batch_size,
            "data": {
                "train_file": str(self.rows.path),
                "train_samples": len(self.train),
                "global_batch_size": self.global_batch_size,
                "seed": self.seed,
                "fingerprint": self.fingerprint(),
            },
        }

    def check_resume(self, state: dict) -> None:
        """Refuse to resume onto other data, or with another batch size or seed."""
        saved = state.get("data", {})
        now = self.state(0)["data"]
        changed = [
            k
            for k in ("train_samples", "global_batch_size", "seed", "fingerprint")
            if saved.get(k) != now[k]
        ]
        if changed:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)} -> now {now[k]}" for k in changed)
            raise DataError(
                f"the checkpoint was trained on other data or batching ({detail}); resume with "
                "the same data.train_file, train.global_batch_size and train.seed, or start a new "
                "output_dir"
            )

    def fingerprint(self) -> str:
        """Hash of the kept rows and their token counts (changes with the data or tokenizer)."""
        digest = hashlib.sha256(self.train.keep_N.tobytes())
        digest.update(self.train.offsets.tobytes())
        return digest.hexdigest()[:16]


def load_sft_data(
    cfg,
    stage: str,
    tokenizer,
    *,
    d_model: int,
    extraction_layer: int | None,
    dp: int,
    pad_multiple: int,
    suffix_ids: list[int] | None = None,
) -> SFTData:
    """Read, check and tokenise the configured files of `stage` (every rank, identically)."""
    data_cfg = cfg.data
    rows = read_sft_file(data_cfg.train_file, stage, skip_bad_rows=data_cfg.skip_bad_rows)
    check_against_model(
        rows, d_model=d_model, extraction_layer=extraction_layer, tokenizer=tokenizer
    )
    tokenized = tokenize(rows, stage, tokenizer, data_cfg, suffix_ids)
    train, held_out = split_eval(tokenized, data_cfg, cfg.train.seed)
    if data_cfg.eval_file:
        eval_rows = read_sft_file(
            data_cfg.eval_file, stage, skip_bad_rows=data_cfg.skip_bad_rows, what="evaluation file"
        )
        check_against_model(
            eval_rows, d_model=d_model, extraction_layer=extraction_layer, tokenizer=tokenizer
        )
        held_out = cap(
            tokenize(eval_rows, stage, tokenizer, data_cfg, suffix_ids),
            data_cfg.eval_max_samples,
            cfg.train.seed,
        )
    if len(train) < cfg.train.global_batch_size:
        log.warning(
            "%d training samples for a global batch of %d: samples repeat within a step",
            len(train),
            cfg.train.global_batch_size,
        )
    pad_id = (
        tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else (tokenizer.eos_token_id or 0)
    )
    return SFTData(
        stage=stage,
        train=train,
        eval=held_out,
        rows=rows,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        seed=cfg.train.seed,
        dp=dp,
        pad_multiple=pad_multiple,
        pad_id=pad_id,
    )


def tokenize(rows: SFTRows, stage: str, tokenizer, data_cfg, suffix_ids) -> TokenizedSFT:
    if stage == "ar_sft":
        suffix = suffix_ids if suffix_ids is not None else rows.sidecar.tokens.critic_suffix_ids
        return tokenize_ar(
            rows,
            tokenizer,
            suffix_ids=suffix,
            max_length=data_cfg.max_length,
            skip=data_cfg.skip_bad_rows,
        )
    return tokenize_av(
        rows,
        tokenizer,
        tokens=rows.sidecar.tokens,
        max_length=data_cfg.max_length,
        skip=data_cfg.skip_bad_rows,
    )


def split_eval(data: TokenizedSFT, data_cfg, seed: int) -> tuple[TokenizedSFT, TokenizedSFT | None]:
    """(training set, held-out set) by document hash; no held-out set with an eval_file."""
    if data_cfg.eval_file or data_cfg.eval_fraction == 0:
        return data, None
    doc_ids = [data.source.doc_ids[int(i)] for i in data.keep_N]
    held_N = np.array([_doc_hash(d) < data_cfg.eval_fraction * _HASH_SPACE for d in doc_ids])
    if held_N.all() or not held_N.any():
        log.warning(
            "eval_fraction=%s holds out %s of %d samples: no evaluation set",
            data_cfg.eval_fraction,
            "all" if held_N.all() else "none",
            len(data),
        )
        return data, None
    train = data.subset(np.flatnonzero(~held_N))
    return train, cap(data.subset(np.flatnonzero(held_N)), data_cfg.eval_max_samples, seed)


def cap(data: TokenizedSFT, limit: int, seed: int) -> TokenizedSFT:
    if len(data) <= limit:
        return data
    chosen = np.sort(np.random.Generator(np.random.PCG64([seed, 7])).permutation(len(data))[:limit])
    return data.subset(chosen)


def _doc_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:4], "big")


def describe_samples(data: TokenizedSFT, samples: np.ndarray) -> list[str]:
    return [data.describe(int(i)) for i in samples]
