"""AV/AR checkpoints: saved at one layout, loaded at another, exported in the released layout.

Why: users train at one layout, resume or evaluate at another, and publish HF directories that
others load with transformers.  The AR's head is perturbed away from the identity first, so a
head that is dropped, transposed or re-initialised on the way shows up.  fp32 tolerance as in
test_nla_parity.py (1e-5; TP re-associates sums).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file, save_file

from nla_mcore.converters.nla_export import export_nla
from nla_mcore.prompts import build_av_prompt, select_marker
from nla_mcore.sidecar import check_marker, read_model_sidecar
from tests.converters.convert_worker import make_hf_model
from tests.models.nla_worker import EXTRACTION_LAYER, ar_inputs, hf_ar_outputs, nla_jobs, save_rank
from tests.multirank import run_ranks

ATOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """qwen2: an AR saved by a TP=2 job (perturbed head) and an AV saved by a TP=1 job."""
    root = tmp_path_factory.mktemp("nla_export")
    hf_dir = make_hf_model("qwen2", root / "hf")
    run_ranks(save_rank, 2, "ar", str(hf_dir), dict(tensor_parallel=2), str(root / "ar_ckpt"), 3)
    run_ranks(save_rank, 1, "av", str(hf_dir), {}, str(root / "av_ckpt"))
    tokens, index = ar_inputs(hf_dir)
    save_file({"tokens": tokens, "readout_index": index}, str(root / "ar_in.safetensors"))
    run_ranks(
        nla_jobs,
        2,
        [
            (
                "ar",
                {"ckpt_dir": str(root / "ar_ckpt")},
                dict(pipeline_parallel=2),
                str(root / "ar_in.safetensors"),
                str(root / "ar_pp2.out"),
            ),
            (
                "ar",
                {"ckpt_dir": str(root / "ar_ckpt")},
                dict(tensor_parallel=2),
                str(root / "ar_in.safetensors"),
                str(root / "ar_tp2.out"),
            ),
        ],
    )
    return root, hf_dir, tokens, index


@pytest.mark.slow
def test_ar_checkpoint_reloads_at_another_layout(saved):
    root, hf_dir, tokens, index = saved
    pp2 = load_file(str(root / "ar_pp2.out"))["out"]
    tp2 = load_file(str(root / "ar_tp2.out"))["out"]
    identity = hf_ar_outputs(hf_dir, tokens, index)
    assert (pp2 - tp2).abs().max().item() <= ATOL
    assert (pp2 - identity).abs().max().item() > 1e-3, "the perturbed head did not survive the save"


@pytest.mark.slow
def test_exported_ar_reproduces_our_ar_with_transformers(saved, tmp_path):
    root, hf_dir, tokens, index = saved
    out = export_nla(root / "ar_ckpt", tmp_path / "ar")
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.num_hidden_layers == EXTRACTION_LAYER + 1
    head = load_file(str(out / "value_head.safetensors"))["weight"]
    ours = load_file(str(root / "ar_pp2.out"))["out"]
    theirs = hf_ar_outputs(out, tokens, index, head=head)  # transformers + the value head
    assert (theirs - ours).abs().max().item() <= ATOL
    names = set(load_file(str(next(out.glob("model*.safetensors")))))
    assert not any(n.startswith("lm_head") or n == "model.norm.weight" for n in names)
    sidecar = read_model_sidecar(out)
    assert (sidecar.role, sidecar.extraction_layer_index, sidecar.extraction.injection_scale) == (
        "ar",
        EXTRACTION_LAYER,
        None,
    )


@pytest.mark.slow
def test_exported_av_has_a_checked_sidecar(saved, tmp_path):
    root, hf_dir, *_ = saved
    out = export_nla(root / "av_ckpt", tmp_path / "av")
    sidecar = read_model_sidecar(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    prompt = check_marker(sidecar, tokenizer)  # marker, neighbours and template match
    assert prompt.ids == build_av_prompt(tokenizer, select_marker(tokenizer)).ids
    assert sidecar.role == "av" and sidecar.extraction.injection_scale > 0
    for name in ("config.json", "tokenizer.json"):
        assert (Path(out) / name).is_file()
    # untrained AV = the base model: the export must load with identical weights
    a = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert yaml.safe_load((Path(out) / "nla_meta.yaml").read_text())["kind"] == "nla_model"
