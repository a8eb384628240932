"""AV and AR on Megatron-Core equal their transformers definitions at every layout.

AV: a tiny HF model whose input embeddings are spliced at the marker (after the embedding and
Gemma's sqrt(d) scale) gives the same logits as our AV (virtual-token injection) at TP1,
TP2+SP, PP2 and CP2.  AR: transformers' output of block K (no final norm) at each sample's last
non-pad token, through the identity head, equals our AR at the same layouts, with right padding
of different lengths.  fp32; tolerance as in test_conversion.py: 1e-5 max |diff| (TP/CP
re-associate sums; observed ~1e-6), where a wrong position, a scaled injected row or a missing
CP chunk gives O(1) errors.
"""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from nla_mcore.models.injection import inject
from tests.converters.convert_worker import make_hf_model
from tests.models.nla_worker import (
    INJECTION_SCALE,
    ar_inputs,
    av_inputs,
    hf_ar_outputs,
    hf_av_logits,
    nla_jobs,
)
from tests.multirank import run_ranks

FAMILIES = ("qwen2", "llama", "gemma3")
LAYOUTS = {  # name: (world size, parallel)
    "tp1": (1, {}),
    "tp2_sp": (2, dict(tensor_parallel=2, sequence_parallel=True)),
    "pp2": (2, dict(pipeline_parallel=2)),
    "cp2": (2, dict(context_parallel=2)),
}
ATOL = 1e-5


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory):
    """Per family: HF references and our AV/AR outputs at every layout (one launch per world)."""
    cache = {}

    def get(family):
        if family in cache:
            return cache[family]
        root = tmp_path_factory.mktemp(f"nla_{family}")
        hf_dir = make_hf_model(family, root / "hf")
        tokens, vectors, marker, pos = av_inputs(hf_dir)
        vocab = len(__import__("transformers").AutoTokenizer.from_pretrained(hf_dir))
        virtual, table = inject(
            tokens, vectors, tokens=marker, vocab_size=vocab, injection_scale=INJECTION_SCALE
        )
        save_file({"tokens": virtual, "injection": table}, str(root / "av.safetensors"))
        ar_tokens, index = ar_inputs(hf_dir)
        save_file({"tokens": ar_tokens, "readout_index": index}, str(root / "ar.safetensors"))
        jobs_by_world: dict[int, list] = {}
        for name, (world, parallel) in LAYOUTS.items():
            for kind in ("av", "ar"):
                jobs_by_world.setdefault(world, []).append(
                    (
                        kind,
                        {"hf_dir": str(hf_dir)},
                        parallel,
                        str(root / f"{kind}.safetensors"),
                        str(root / f"{kind}_{name}.out"),
                    )
                )
        for world, jobs in jobs_by_world.items():
            run_ranks(nla_jobs, world, jobs)
        ours = {
            (k, n): load_file(str(root / f"{k}_{n}.out"))["out"]
            for k in ("av", "ar")
            for n in LAYOUTS
        }
        refs = {
            "av": hf_av_logits(hf_dir, tokens, vectors, pos),
            "ar": hf_ar_outputs(hf_dir, ar_tokens, index),
        }
        cache[family] = dict(
            root=root, hf_dir=hf_dir, ours=ours, refs=refs, av=(tokens, vectors, pos)
        )
        return cache[family]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["av", "ar"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers_at_every_layout(family, kind, parity_runs):
    run = parity_runs(family)
    reference = run["refs"][kind]
    for name in LAYOUTS:
        got = run["ours"][(kind, name)]
        assert got.shape == reference.shape, (name, got.shape, reference.shape)
        err = (got - reference).abs().max().item()
        assert err <= ATOL, f"{family} {kind} {name}: max |ours - transformers| = {err:.2e}"


@pytest.mark.slow
def test_gemma_injected_row_is_not_scaled(parity_runs):
    """Gemma multiplies word embeddings by sqrt(d); the injected vector must not be.  Our AV
    matches the unscaled splice (above) and must differ from the scaled one (so the parity test
    would catch the bug)."""
    run = parity_runs("gemma3")
    tokens, vectors, pos = run["av"]
    scaled = hf_av_logits(run["hf_dir"], tokens, vectors, pos, scale_injected_by=64**0.5)
    ours = run["ours"][("av", "tp1")]
    assert (ours - scaled).abs().max().item() > 1e-2
    assert (ours - run["refs"]["av"]).abs().max().item() <= ATOL
