"""Every family builds from its HF config and trains one forward + backward at world size 1."""

from __future__ import annotations

from tests.multirank import run_ranks

FAMILY_PARAMS = {
    # parameters that only exist because of a family's traits
    "qwen2": {"decoder.layers.0.self_attention.linear_qkv.bias", "output_layer.weight"},
    "llama": {"output_layer.weight"},
    "gemma3": {
        "decoder.layers.0.self_attention.q_layernorm.weight",
        "decoder.layers.0.self_attention.k_layernorm.weight",
        "decoder.layers.0.self_attention.linear_proj.post_layernorm.weight",
        "decoder.layers.0.mlp.linear_fc2.post_layernorm.weight",
    },
}


def build_and_step(families):
    import torch

    from nla_mcore.models.build import build_model, make_recipe
    from nla_mcore.models.hf_config import parse_hf_config
    from nla_mcore.runtime.distributed import init_distributed, set_seed
    from nla_mcore.runtime.parallel import ParallelConfig, initialize_model_parallel
    from nla_mcore.toy import toy_hf_config

    init_distributed("cpu")
    par = ParallelConfig()
    initialize_model_parallel(par)
    report = {}
    for family in families:
        set_seed(0)
        hf = parse_hf_config(toy_hf_config(family))
        model = build_model(make_recipe(hf, par))
        tokens = torch.randint(0, hf.vocab_size, (2, 24))
        positions = torch.arange(24).expand(2, 24)
        loss = model(tokens, positions, None, labels=tokens).mean()
        loss.backward()
        report[family] = dict(
            loss=loss.item(),
            names=sorted(n for n, _ in model.named_parameters()),
            zero_grads=sorted(n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0),
            finite=all(torch.isfinite(p.grad).all().item() for p in model.parameters()),
        )
    return report


def test_families_build_forward_backward():
    """Why: the cheapest end-to-end check that each family's spec is wired (a trait whose
    module is missing, or a parameter that receives no gradient, shows up here first)."""
    report = run_ranks(build_and_step, 1, list(FAMILY_PARAMS))[0]
    for family, expected in FAMILY_PARAMS.items():
        r = report[family]
        assert 4.0 < r["loss"] < 10.0, (family, r["loss"])  # ~ln(1536)=7.3 at random init
        assert expected <= set(r["names"]), (family, expected - set(r["names"]))
        assert r["finite"] and not r["zero_grads"], (family, r["zero_grads"])
    assert "output_layer.weight" not in report["gemma3"]["names"]  # tied to the embedding
