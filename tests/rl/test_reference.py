"""The KL reference (the SFT AV, a host copy) swapped into the live, DDP-wrapped AV: inside,
the live modules compute exactly what the SFT model computes; afterwards the live weights,
their gradients and the DDP buffers are bit-identical to before."""

from __future__ import annotations

import torch

from tests.converters.convert_worker import make_hf_model
from tests.multirank import run_ranks


def swap_rank(hf_dir: str, parallel: dict) -> dict:
    from nla_mcore.models.build import make_recipe
    from nla_mcore.models.hf_config import load_hf_config
    from nla_mcore.models.nla import build_av
    from nla_mcore.rl.reference import ReferencePolicy
    from nla_mcore.runtime.distributed import init_distributed, set_seed
    from nla_mcore.runtime.parallel import ParallelConfig, initialize_model_parallel
    from nla_mcore.train.engine import forward_collect, wrap_ddp
    from nla_mcore.train.lm import lm_microbatch, logits_forward_step

    init_distributed("cpu")
    par = ParallelConfig(**parallel)
    initialize_model_parallel(par)
    set_seed(0)
    recipe = make_recipe(load_hf_config(hf_dir), par, dtype="float32", backend="local")
    live = wrap_ddp(build_av(recipe, hf_dir=hf_dir), distributed_optimizer=True)  # as training
    reference = ReferencePolicy(live)  # the SFT weights, before any RL update
    tokens = torch.randint(
        0, recipe.hf.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)
    )
    batch = [lm_microbatch(tokens)]

    def logits(model):
        model.eval()
        with torch.no_grad():
            return forward_collect(model, logits_forward_step, batch, seq_length=16)[0].clone()

    sft_logits = logits(live)
    with torch.no_grad():  # "training": every weight moves, and gradients accumulate
        for p in live.parameters():
            p.add_(torch.randn_like(p) * 0.01)
            p.main_grad.copy_(torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in live.named_parameters()}
    grads = {n: p.main_grad.clone() for n, p in live.named_parameters()}
    buffers = [b.param_data.clone() for b in live.buffers]
    live_logits = logits(live)
    with reference.swapped_in():
        inside = logits(live)
        equal_inside = all(
            torch.equal(p, r) for p, r in zip(reference.params, reference.reference, strict=True)
        )
    return dict(
        inside_vs_sft=(inside - sft_logits).abs().max().item(),
        live_vs_sft=(live_logits - sft_logits).abs().max().item(),
        equal_inside=equal_inside,
        weights_restored=all(torch.equal(before[n], p) for n, p in live.named_parameters()),
        grads_untouched=all(torch.equal(grads[n], p.main_grad) for n, p in live.named_parameters()),
        buffers_restored=all(
            torch.equal(old, b.param_data) for old, b in zip(buffers, live.buffers, strict=True)
        ),
        after_vs_live=(logits(live) - live_logits).abs().max().item(),
        swaps=reference.swaps,
    )


def test_reference_swap_computes_sft_and_restores_the_live_model(tmp_path):
    hf_dir = make_hf_model("qwen2", tmp_path / "hf")
    for parallel, world in (({}, 1), (dict(tensor_parallel=2), 2)):
        got = run_ranks(swap_rank, world, str(hf_dir), parallel)[0]
        assert got["live_vs_sft"] > 1e-3, (
            "the update must change the logits for the test to mean anything"
        )
        assert got["inside_vs_sft"] == 0.0 and got["equal_inside"], got
        assert got["weights_restored"] and got["grads_untouched"] and got["buffers_restored"], got
        assert got["after_vs_live"] == 0.0 and got["swaps"] == 1, got
