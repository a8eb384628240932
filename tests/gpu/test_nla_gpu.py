"""AV injection and AR readout on GPUs in bf16: TP2, CP2 and PP2 through NCCL (and 1 GPU).

Why: the CPU parity tests prove the maths in fp32; this runs the same injection (virtual ids,
the embedding stage, CP splitting after injection) and AR readout (SP gather, CP ownership) with
CUDA kernels and NCCL.  bf16 tolerance: each result's relative error against transformers in
fp32 (mean |Δ| / mean |ref|) must stay within 3x of transformers' own bf16 error on the same
inputs plus 1e-3 (bf16 rounding differs by kernel; a misplaced or unscaled vector is O(1)).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from nla_mcore.models.injection import inject
from tests.converters.convert_worker import make_hf_model
from tests.gpu.conftest import gpu_count
from tests.gpu.test_parallel_gpu import NCCL_ENV
from tests.models.nla_worker import (
    INJECTION_SCALE,
    ar_inputs,
    av_inputs,
    hf_ar_outputs,
    hf_av_logits,
    nla_jobs,
)
from tests.multirank import run_ranks

pytestmark = pytest.mark.gpu

FAMILIES = ("qwen2", "llama", "gemma3")
LAYOUTS = {
    "tp1": (1, {}),
    "tp2": (2, dict(tensor_parallel=2)),
    "cp2": (2, dict(context_parallel=2)),
    "pp2": (2, dict(pipeline_parallel=2)),
}


def rel_err(a, ref):
    return ((a.float() - ref).abs().mean() / ref.abs().mean()).item()


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nla_gpu")
    refs, jobs = {}, {name: [] for name in LAYOUTS}  # one launch per layout
    for family in FAMILIES:
        hf_dir = make_hf_model(family, root / family)
        tokens, vectors, marker, pos = av_inputs(hf_dir)
        vocab = len(transformers.AutoTokenizer.from_pretrained(hf_dir))
        virtual, table = inject(
            tokens, vectors, tokens=marker, vocab_size=vocab, injection_scale=INJECTION_SCALE
        )
        save_file({"tokens": virtual, "injection": table}, str(root / f"{family}_av.safetensors"))
        ar_tokens, index = ar_inputs(hf_dir)
        save_file(
            {"tokens": ar_tokens, "readout_index": index}, str(root / f"{family}_ar.safetensors")
        )
        refs[(family, "av")] = hf_av_logits(hf_dir, tokens, vectors, pos)
        refs[(family, "ar")] = hf_ar_outputs(hf_dir, ar_tokens, index)
        refs[(family, "av", "bf16")] = _hf_bf16(hf_dir, "av", (tokens, vectors, pos))
        refs[(family, "ar", "bf16")] = _hf_bf16(hf_dir, "ar", (ar_tokens, index))
        for name, (world, parallel) in LAYOUTS.items():
            if world > gpu_count():
                continue
            for kind in ("av", "ar"):
                jobs[name].append(
                    (
                        kind,
                        {"hf_dir": str(hf_dir)},
                        parallel,
                        str(root / f"{family}_{kind}.safetensors"),
                        str(root / f"{family}_{kind}_{name}.out"),
                        "cuda",
                        "bfloat16",
                    )
                )
    for name, layout_jobs in jobs.items():
        if layout_jobs:
            run_ranks(nla_jobs, LAYOUTS[name][0], layout_jobs, env=NCCL_ENV, timeout=600)
    return root, refs


def _hf_bf16(hf_dir, kind, inputs):
    """transformers' own bf16 result (the yardstick), computed on the GPU."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        if kind == "av":
            from nla_mcore.prompts import normalize

            tokens, vectors, pos = inputs
            embeds = model.get_input_embeddings()(tokens.cuda()).clone()
            embeds[:, pos] = normalize(vectors.cuda(), INJECTION_SCALE).to(embeds.dtype)
            return model(inputs_embeds=embeds).logits.float().cpu()
        from tests.models.nla_worker import EXTRACTION_LAYER

        tokens, index = inputs
        captured = {}
        model.model.layers[EXTRACTION_LAYER].register_forward_hook(
            lambda m, i, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o)
        )
        model(tokens.cuda())
        return captured["h"][torch.arange(tokens.shape[0]), index.cuda()].float().cpu()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["av", "ar"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_parity(family, kind, layout, gpu_runs):
    if LAYOUTS[layout][0] > gpu_count():
        pytest.skip(f"needs {LAYOUTS[layout][0]} GPUs")
    root, refs = gpu_runs
    ours = load_file(str(root / f"{family}_{kind}_{layout}.out"))["out"]
    reference = refs[(family, kind)]
    yardstick = rel_err(refs[(family, kind, "bf16")], reference)
    err = rel_err(ours, reference)
    print(f"{family} {kind} {layout}: rel err {err:.2e} (transformers bf16: {yardstick:.2e})")
    assert err <= 3 * yardstick + 1e-3
