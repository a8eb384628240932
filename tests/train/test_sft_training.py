"""SFT runs end to end on gloo ranks: exact resume, parallel layouts, learning, failures.

Every run is a real `nla_mcore.train.sft.run` (Megatron-Core schedules, DDP, the distributed
optimizer, async dist-checkpoints) of a tiny qwen2 model on the toy world of `sft_toys.py`,
in fp32 on the CPU.  The runs are grouped into few spawns (starting ranks costs seconds).

Tolerances: a resumed run must reproduce the uninterrupted one bit for bit (same layout, same
process count, deterministic CPU kernels).  Other layouts change only the order of fp32
reductions (TP splits the matmuls' inner sums, CP the attention's, PP and DP the micro-batch
sums), measured at ~1e-7 relative; 1e-5 on the loss and 1e-4 on the gradient norm leave room
for that and still catch a wrong gradient scale (a TP norm that missed a shard was 25 % off).
"""

from __future__ import annotations

import pytest

from nla_mcore.toy_tokenizers import build_toy_tokenizer
from tests.converters.convert_worker import make_hf_model
from tests.multirank import run_ranks
from tests.train.sft_toys import sft_files
from tests.train.sft_worker import base_overrides, head_loss_rank, nan_at_step_run, sft_runs

STEPS = 6
HALF = 3
LAYOUTS = {
    "tp2": ["parallel.tensor_parallel=2"],
    "tp2_sp": ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline_parallel=2"],
    "cp2": ["parallel.context_parallel=2"],
    "dp2": [],  # the distributed optimizer shards over the two DP ranks
}
ROLES = ("ar", "av")
# held-out evaluation before training, at step 3 and at the end (forward-only schedules too)
EVAL = ["data.eval_fraction=0.25", f"train.eval_every={HALF}"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    model = make_hf_model("qwen2", root / "hf")
    data = sft_files(root / "data", build_toy_tokenizer("qwen2"))
    return root, model, data


def job(world, role, name, *extra):
    """(role, overrides) of a run whose output directory is runs/{role}_{name}."""
    root, model, data = world
    out = root / "runs" / f"{role}_{name}"
    return role, [*base_overrides(model, data, out, role), f"train.steps={STEPS}", *extra]


@pytest.fixture(scope="module")
def runs(world):
    """Metrics of every run by (role, name): three spawns in the order resuming needs (a run
    that resumes appends to its directory's metrics, so its last read holds all its steps)."""
    first = [("ref", r) for r in ROLES] + [
        ("resumed", r, f"train.stop_after={HALF}") for r in ROLES
    ]
    two = [(n, r, *o) for r in ROLES for n, o in LAYOUTS.items()]
    two.append(("dp2_to_dp1", "ar", f"train.stop_after={HALF}"))
    second = [("resumed", r) for r in ROLES] + [("dp2_to_dp1", "ar")]
    results = {}
    for specs, ranks in ((first, 1), (two, 2), (second, 1)):
        jobs = [job(world, role, name, *EVAL, *extra) for name, role, *extra in specs]
        for (name, role, *_), metrics in zip(
            specs, run_ranks(sft_runs, ranks, jobs)[0], strict=True
        ):
            results[(role, name)] = metrics
    return results


def curve(metrics, key):
    return [r[key] for r in metrics["train"]]


def evaluations(metrics) -> dict[int, dict]:
    """{step: {metric: value}} of a run's held-out evaluations."""
    skip = {"kind", "step", "time"}
    return {r["step"]: {k: v for k, v in r.items() if k not in skip} for r in metrics["eval"]}


@pytest.mark.slow
@pytest.mark.parametrize("role", ROLES)
def test_resumed_run_is_bit_identical(runs, role):
    """3 steps, a fresh process resuming for 3 more: the same losses, LRs and gradient norms as
    6 straight steps, to the last bit (weights, Adam state, schedule, data order all restored)."""
    ref, resumed = runs[(role, "ref")], runs[(role, "resumed")]
    assert [r["step"] for r in resumed["train"]] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm"):
        assert curve(resumed, key) == curve(ref, key), key
    ref_evals, resumed_evals = evaluations(ref), evaluations(resumed)
    assert sorted(ref_evals) == [0, HALF, STEPS] and sorted(resumed_evals) == [0, STEPS]
    assert resumed_evals[STEPS] == ref_evals[STEPS]


@pytest.mark.slow
def test_resume_from_dp2_into_dp1(runs):
    """A checkpoint of a DP2 run (distributed optimizer, sharded state) resumes on one rank and
    continues the DP2 curve."""
    dp2, resumed = runs[("ar", "dp2")], runs[("ar", "dp2_to_dp1")]
    assert curve(resumed, "lr") == curve(dp2, "lr")
    for a, b in zip(curve(resumed, "loss"), curve(dp2, "loss"), strict=True):
        assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("role", ROLES)
def test_layout_matches_one_rank(runs, role, layout):
    ref, got = runs[(role, "ref")], runs[(role, layout)]
    assert curve(got, "lr") == curve(ref, "lr")
    assert curve(got, "loss") == pytest.approx(curve(ref, "loss"), rel=1e-5)
    assert curve(got, "grad_norm") == pytest.approx(curve(ref, "grad_norm"), rel=1e-4)
    ref_evals, got_evals = evaluations(ref), evaluations(got)
    assert sorted(got_evals) == sorted(ref_evals) == [0, HALF, STEPS]
    for step, values in ref_evals.items():
        assert got_evals[step] == pytest.approx(values, rel=1e-5, abs=1e-6), step


@pytest.fixture(scope="module")
def learned(world):
    """An AR and an AV trained long enough to use their inputs, with held-out evaluation, and
    the AR's step-0 loss with its identity head vs a random one (one spawn)."""
    root, model, data = world
    quick = [
        "optim.lr=3e-3",
        "optim.decay=constant",
        "data.eval_fraction=0.25",
        "train.global_batch_size=16",
        "train.micro_batch_size=8",
        "logging.plot=true",
        "logging.tensorboard=true",
    ]
    jobs = [
        job(world, "ar", "learn", *quick, "train.steps=40", "train.eval_every=40"),
        job(world, "av", "learn", *quick, "train.steps=100", "train.eval_every=100"),
    ]
    ar, av = run_ranks(sft_runs, 1, jobs)[0]
    heads = run_ranks(head_loss_rank, 1, str(model), str(data["ar_sft"]))[0]
    return {"ar": ar, "av": av, "heads": heads, "root": root}


@pytest.mark.slow
def test_ar_learns_the_vector_from_the_explanation(learned):
    """On held-out documents the AR reconstructs the toy world's vectors: FVE (rawvar baseline)
    rises from below 0 (a random prediction) to well above it."""
    before, after = learned["ar"]["eval"][0], learned["ar"]["eval"][-1]
    assert before["step"] == 0 and before["fve"] < 0
    assert after["fve"] > 0.3, after


@pytest.mark.slow
def test_identity_head_starts_lower_than_a_random_head(learned):
    """NLA.md: a random value head costs ~0.3 of step-0 loss (1.94 vs 1.61).  Layer-K states of
    one model share directions, which the identity head keeps and a random head scrambles."""
    heads = learned["heads"]
    assert heads["identity"] < heads["random"] - 0.01, heads


@pytest.mark.slow
def test_av_reads_the_injected_vector(learned):
    """Negative control: on held-out samples the trained AV's loss is far lower with each
    sample's own vector than with another sample's (if injection were silently skipped the two
    would be equal, and the AV could only learn the average explanation)."""
    before, after = learned["av"]["eval"][0], learned["av"]["eval"][-1]
    assert before["loss_shuffled"] == pytest.approx(before["loss"], abs=0.05)
    assert after["loss_shuffled"] - after["loss"] > 0.1, after


@pytest.mark.slow
def test_curves_and_tensorboard_are_written(learned):
    run = learned["root"] / "runs" / "ar_learn"
    assert (run / "curves.png").stat().st_size > 10_000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_nan_step_stops_before_the_update_naming_step_and_sample(world):
    """A NaN that appears inside step 3 (past the file checks) stops the run on every rank
    before the optimizer touches the weights; the message names the step, the rank, the
    micro-batch and the sample's file row; checkpoint step 2 stays the newest complete one."""
    root, _, _ = world
    role, overrides = job(world, "ar", "nan", "checkpoint.every=1", "train.steps=4")
    (result,) = run_ranks(nan_at_step_run, 1, role, overrides, 3)
    error = result["error"]
    assert error is not None and error.startswith("step 3: loss nan"), error
    assert "rank 0 micro-batch" in error and result["sample"] in error, error
    assert not result["weights_moved"]
    steps = sorted(p.name for p in (root / "runs" / "ar_nan" / "checkpoints").iterdir())
    assert steps == ["step_0000001", "step_0000002"], steps
