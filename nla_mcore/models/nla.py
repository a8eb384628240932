"""Build the two NLA models for this rank, from an HF base checkpoint or an nla-mcore checkpoint.

* AV: the family's full `NLAGPTModel`; it takes an injection table (`injection.inject`).
* AR: `ARModel` over the first K+1 decoder layers (`backbone_only`: no final norm, no LM head)
  with the identity value head.  From an HF base, the first K+1 layers are read directly
  (`load_hf_weights` skips the rest); from an nla-mcore AR checkpoint, everything including the
  trained head is loaded at any layout.
"""

from __future__ import annotations

from pathlib import Path

from nla_mcore.models.ar import ARModel
from nla_mcore.models.build import ModelRecipe, build_model, make_recipe


def ar_recipe(base: ModelRecipe, extraction_layer: int) -> ModelRecipe:
    """The AR's recipe: the base recipe truncated to K+1 layers."""
    if not 0 <= extraction_layer < base.hf.num_layers:
        raise ValueError(
            f"extraction layer K={extraction_layer} is outside [0, {base.hf.num_layers - 1}]"
        )
    return make_recipe(
        base.hf,
        base.parallel,
        dtype=base.dtype,
        backend=base.backend,
        num_layers=extraction_layer + 1,
    )


def build_av(
    recipe: ModelRecipe, *, hf_dir: str | Path | None = None, ckpt_dir=None, empty: bool = False
):
    """This rank's AV stage, loaded from `hf_dir` (HF base) or `ckpt_dir` (nla-mcore), or
    `empty` (uninitialised weights for the caller to load, e.g. a training checkpoint)."""
    from nla_mcore.converters.checkpoint import load_checkpoint
    from nla_mcore.converters.hf_to_mcore import load_hf_weights

    model = build_model(recipe, perform_initialization=False)
    if empty:
        return model
    _one_source(hf_dir, ckpt_dir)
    if hf_dir is not None:
        load_hf_weights(model, hf_dir, recipe)
    else:
        load_checkpoint(model, ckpt_dir)
    return model


def build_ar(
    recipe: ModelRecipe, *, hf_dir: str | Path | None = None, ckpt_dir=None, empty: bool = False
) -> ARModel:
    """This rank's AR stage (`recipe` already truncated to K+1 layers, see `ar_recipe`);
    `empty`: uninitialised backbone and identity head, for the caller to load."""
    from nla_mcore.converters.checkpoint import load_checkpoint
    from nla_mcore.converters.hf_to_mcore import load_hf_weights

    backbone = build_model(recipe, perform_initialization=False, backbone_only=True)
    model = ARModel(backbone)
    if empty:
        return model
    _one_source(hf_dir, ckpt_dir)
    if hf_dir is not None:
        load_hf_weights(backbone, hf_dir, recipe, backbone_only=True)
    else:
        load_checkpoint(model, ckpt_dir)
    return model


def _one_source(hf_dir, ckpt_dir) -> None:
    if (hf_dir is None) == (ckpt_dir is None):
        raise ValueError(
            "give exactly one of hf_dir (HF base model) or ckpt_dir (nla-mcore checkpoint)"
        )
