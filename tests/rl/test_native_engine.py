"""The native rollout engine generates what transformers generates, on the trainer's own
Megatron-Core model, at TP1, TP2 and from a PP2 training layout (gloo), for every family.

Greedy: the same tokens as `generate(inputs_embeds=...)` with the vector spliced at the marker,
and the same log-probs (1e-5; fp32), which without the vector differ by more than that (the
toy models are random, so the control checks that injection is visible at all).  Sampled: the
log-probs the engine reports equal the trainer's teacher-forced recompute at the sampling
temperature (1e-5), which is what PPO's ratio needs.  Also: stop ids and max new tokens, n > 1
sharing one prefill, seeds, the model handed back in training mode, the KV cache released.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nla_mcore.models.injection import InjectionError, inject
from nla_mcore.rl.rollout import FINISH_LENGTH, FINISH_STOP, SamplingParams
from tests.converters.convert_worker import make_hf_model
from tests.multirank import run_ranks
from tests.rl.rollout_worker import engine_rank, hf_greedy, prompts

FAMILIES = ("qwen2", "llama", "gemma3")
NEW = 8
ATOL = 1e-5
LAYOUTS = {"tp1": {}, "tp2": dict(tensor_parallel=2), "pp2": dict(pipeline_parallel=2)}
GREEDY = SamplingParams(max_new_tokens=NEW, temperature=0)
SAMPLED = SamplingParams(max_new_tokens=NEW, temperature=0.9, top_p=0.9, top_k=50, n=3, seed=7)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            hf_dir = make_hf_model(family, tmp_path_factory.mktemp(f"roll_{family}"))
            vectors = torch.randn(2, 64, generator=torch.Generator().manual_seed(0)) * 5
            tokens, meta, pos = prompts(hf_dir, vectors)
            ref_ids, ref_lp = hf_greedy(hf_dir, tokens, vectors, pos, NEW)
            _, control_lp = hf_greedy(hf_dir, tokens, vectors, pos, NEW, inject=False)
            stop = int(ref_ids[0, 3])  # greedy sample 0 reaches it at step 3 (or earlier)
            base = dict(tokens=tokens, vectors=vectors, meta=meta)
            runs = [
                dict(base, params=GREEDY),
                dict(base, params=SAMPLED, recompute=True),
                dict(base, params=SAMPLED),  # the same seed again
                dict(base, params=SamplingParams(**{**SAMPLED.__dict__, "seed": 8})),
                dict(
                    base,
                    params=SamplingParams(max_new_tokens=NEW, temperature=0, n=2, stop_ids=(stop,)),
                ),
            ]
            ours = {}
            for name, parallel in LAYOUTS.items():
                world = max(
                    1, parallel.get("tensor_parallel", 1) * parallel.get("pipeline_parallel", 1)
                )
                last_rank = run_ranks(engine_rank, world, str(hf_dir), parallel, runs)[-1]
                ours[name] = [
                    {
                        k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
                        for k, v in r.items()
                    }
                    for r in last_rank
                ]
            cache[family] = dict(ref=(ref_ids, ref_lp), control=control_lp, stop=stop, ours=ours)
        return cache[family]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_generate(setup, family, layout):
    run = setup(family)
    ref_ids, ref_lp = run["ref"]
    greedy = run["ours"][layout][0]
    assert greedy["tokens"].tolist() == ref_ids.tolist()
    torch.testing.assert_close(greedy["logprobs"], ref_lp, atol=ATOL, rtol=0)
    assert (ref_lp - run["control"]).abs().max() > 10 * ATOL, "the vector must be visible"
    assert greedy["finish"] == [FINISH_LENGTH] * 2 and greedy["lengths"].tolist() == [NEW] * 2


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_logprobs_equal_the_trainers_recompute(setup, family, layout):
    sampled = setup(family)["ours"][layout][1]
    assert sampled["tokens"].shape == (2 * SAMPLED.n, NEW)
    torch.testing.assert_close(sampled["logprobs"], sampled["recomputed"], atol=ATOL, rtol=0)
    # and the GRPO step's own pass (rl.policy: vocab-parallel kernel, no vocabulary gather)
    torch.testing.assert_close(sampled["trainer"], sampled["recomputed"], atol=ATOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_seeds_layouts_prefill_sharing_and_mode(setup, family):
    ours = setup(family)["ours"]
    first, again, other = (ours["tp1"][i] for i in (1, 2, 3))
    assert torch.equal(first["tokens"], again["tokens"]), "a seed fixes the samples"
    assert not torch.equal(first["tokens"], other["tokens"])
    for layout in ("tp2", "pp2"):
        assert torch.equal(first["tokens"], ours[layout][1]["tokens"]), f"{layout} samples as TP1"
    # one prefill of the B = 2 prompts, then N = 6 rows per decode step
    assert first["forward_batch_sizes"] == [2] + [6] * (NEW - 1)
    assert all(r["training"] for r in ours["tp1"]), "the model is handed back in training mode"
    assert first["stats"]["kv_cache_bytes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_stop_ids_end_a_sample_and_max_new_tokens_the_rest(setup, family):
    run = setup(family)
    ref_ids = run["ref"][0]
    stopped = run["ours"]["pp2"][4]
    for i, prompt in enumerate((0, 0, 1, 1)):  # n = 2, prompt-major
        row = ref_ids[prompt].tolist()
        if run["stop"] in row:
            end = row.index(run["stop"]) + 1
            assert stopped["finish"][i] == FINISH_STOP and stopped["lengths"][i] == end
            assert stopped["tokens"][i, :end].tolist() == row[:end]
            assert set(stopped["tokens"][i, end - 1 :].tolist()) == {run["stop"]}  # padding
            assert (stopped["logprobs"][i, end:] == 0).all()
        else:
            assert stopped["finish"][i] == FINISH_LENGTH and stopped["lengths"][i] == NEW


def test_bad_prompts_get_the_injections_named_errors():
    from nla_mcore.sidecar import Tokens

    meta = Tokens(
        injection_char="x",
        injection_token_id=9,
        injection_left_neighbor_id=8,
        injection_right_neighbor_id=10,
    )
    good = torch.tensor([[1, 8, 9, 10, 2]])
    with pytest.raises(InjectionError, match="marker"):
        inject(
            torch.tensor([[1, 8, 7, 10, 2]]),
            torch.ones(1, 4),
            tokens=meta,
            vocab_size=50,
            injection_scale=1.0,
        )
    with pytest.raises(InjectionError, match="2 samples but vectors of shape"):
        inject(
            good.expand(2, -1), torch.ones(3, 4), tokens=meta, vocab_size=50, injection_scale=1.0
        )
    with pytest.raises(InjectionError, match="width 4, the model's d is 8"):
        inject(good, torch.ones(1, 4), tokens=meta, vocab_size=50, injection_scale=1.0, d_model=8)


def test_sampling_parameters_are_checked():
    with pytest.raises(ValueError, match=r"top_p=0 .*n=0"):
        SamplingParams(top_p=0, n=0)


@pytest.mark.slow
@pytest.mark.parametrize("kl_kind", ["k1", "k3"])
def test_one_grpo_update_on_the_engines_rollouts(tmp_path, kl_kind):
    """The AV's GRPO loss through Megatron-Core's schedule (two micro-batches, vocab-parallel
    log-probs) equals the GRPO maths on an independent teacher-forced recompute, at TP1, TP2
    and PP2, with the same gradient norm; and the next rollout sees the update (no weight
    sync: the engine generates with the trained modules)."""
    from tests.rl.rollout_worker import grpo_step_rank

    hf_dir = make_hf_model("llama", tmp_path / "hf")
    got = {}
    for name, parallel in LAYOUTS.items():
        world = parallel.get("tensor_parallel", 1) * parallel.get("pipeline_parallel", 1)
        got[name] = run_ranks(grpo_step_rank, world, str(hf_dir), parallel, kl_kind)[-1]
    for name, r in got.items():
        assert r["loss"] == pytest.approx(r["expected"], abs=1e-5), (name, r)
        assert r["grad_norm"] == pytest.approx(got["tp1"]["grad_norm"], rel=1e-4), (name, r)
        assert r["grad_norm"] > 0 and r["samples_changed"], (name, r)
