"""The AR's side of a GRPO step: failed samples are named and get the failure reward, the
live AR's reward path (forward only, fused normalised MSE) agrees with its training path
(the SFT loss on the same micro-batches) before the update, at TP1, TP2, PP2 and CP2."""

from __future__ import annotations

import math

import pytest
import torch

from nla_mcore.rl.rollout import FINISH_LENGTH, FINISH_STOP, Rollout
from tests.converters.convert_worker import make_hf_model
from tests.multirank import run_ranks

TEXTS = [
    "The text is about cats and dogs.",
    "A list of rivers, in a formal tone.",
    None,  # truncated
    "no tags here",  # unparseable
    "Numbers and counting, playful.",
]


def fake_rollout(tokenizer, stop_id: int) -> Rollout:
    rows, reasons = [], []
    for text in TEXTS:
        if text is None:
            rows.append(tokenizer.encode("<explanation>\nunfinished", add_special_tokens=False))
            reasons.append(FINISH_LENGTH)
            continue
        body = f"<explanation>\n{text}\n</explanation>" if text != "no tags here" else text
        rows.append(tokenizer.encode(body, add_special_tokens=False) + [stop_id])
        reasons.append(FINISH_STOP)
    t = max(map(len, rows))
    tokens = torch.tensor([r + [r[-1]] * (t - len(r)) for r in rows])
    return Rollout(
        tokens_NT=tokens,
        logprobs_NT=torch.zeros(tokens.shape),
        lengths_N=torch.tensor([len(r) for r in rows]),
        finish_reasons=reasons,
    )


def ar_reward_rank(hf_dir: str, parallel: dict) -> dict:
    from functools import partial

    from transformers import AutoTokenizer

    from nla_mcore.models.build import make_recipe
    from nla_mcore.models.hf_config import load_hf_config
    from nla_mcore.models.nla import ar_recipe, build_ar
    from nla_mcore.prompts import AR_PROMPT_TEMPLATE
    from nla_mcore.rl import grpo
    from nla_mcore.rl.ar_reward import ar_microbatches, parse_rollout, reward_path_mse, sample_mse
    from nla_mcore.runtime.distributed import init_distributed, set_seed
    from nla_mcore.runtime.parallel import ParallelConfig, initialize_model_parallel
    from nla_mcore.train.engine import forward_backward, wrap_ddp
    from nla_mcore.train.nla_steps import ar_forward_step

    init_distributed("cpu")
    par = ParallelConfig(**parallel)
    initialize_model_parallel(par)
    set_seed(0)
    recipe = make_recipe(load_hf_config(hf_dir), par, dtype="float32", backend="local")
    ar = wrap_ddp(build_ar(ar_recipe(recipe, 2), hf_dir=hf_dir), distributed_optimizer=True)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    stop = tok.eos_token_id
    parsed = parse_rollout(tok, fake_rollout(tok, stop), [stop])
    vectors = torch.randn(
        len(TEXTS), recipe.hf.hidden_size, generator=torch.Generator().manual_seed(2)
    )
    from nla_mcore.prompts import ar_prompt_ids

    long_limit = max(len(ar_prompt_ids(tok, t)) for t in TEXTS[:2])  # the last one will exceed
    parsed.texts[4] = parsed.texts[4] + " and more" * 20
    mbs, row_sample = ar_microbatches(
        tok,
        AR_PROMPT_TEMPLATE,
        parsed,
        vectors,
        max_length=long_limit,
        micro_batch_size=1,
        pad_id=tok.pad_token_id or 0,
    )
    reward_mse = reward_path_mse(ar, mbs, None)
    ar.train()
    train = forward_backward(
        ar,
        partial(ar_forward_step, mse_scale=None),
        mbs,
        seq_length=max(mb["tokens"].shape[1] for mb in mbs),
        loss_key="ar_mse",
    )
    mse_N = sample_mse(parsed, row_sample, reward_mse)
    return dict(
        failures=parsed.failures,
        counts=parsed.counts(),
        rows=row_sample,
        reward_mean=float(reward_mse.mean()),
        train_loss=train.loss,
        rewards=grpo.rewards(mse_N, parsed.failed_N).tolist(),
        log_rewards=grpo.rewards(mse_N, parsed.failed_N, "log").tolist(),
    )


@pytest.mark.slow
def test_failures_rewards_and_the_two_ar_paths_agree(tmp_path):
    hf_dir = make_hf_model("gemma3", tmp_path / "hf")
    results = {}
    for name, parallel in (
        ("tp1", {}),
        ("tp2", dict(tensor_parallel=2)),
        ("pp2", dict(pipeline_parallel=2)),
        ("cp2", dict(context_parallel=2)),
    ):
        world = 1 if not parallel else 2
        results[name] = run_ranks(ar_reward_rank, world, str(hf_dir), parallel)
    for name, ranks in results.items():
        for r in ranks:  # every rank holds the rewards
            assert r["failures"] == [None, None, "truncated", "unparseable", "too_long"], r
            assert r["rows"] == [0, 1] and r["counts"]["too_long"] == 1
            assert r["reward_mean"] == pytest.approx(r["train_loss"], rel=1e-6), (name, r)
            assert r["rewards"][2:] == [-2.0, -2.0, -2.0]
            assert r["log_rewards"][2:] == pytest.approx([-math.log(2)] * 3)
            assert r["rewards"][:2] == pytest.approx(results["tp1"][0]["rewards"][:2], rel=1e-5), (
                name
            )
            assert all(-4 <= x <= 0 for x in r["rewards"])
