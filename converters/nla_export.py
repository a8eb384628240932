"""AV and AR checkpoints and their export to Hugging Face directories in the released layout.

An AV or AR checkpoint is an nla-mcore checkpoint (`checkpoint.py`) whose metadata says its role
(`extra.role`), whether it is a backbone without final norm and LM head (the AR), and which
carries the model sidecar (`nla_meta.yaml`).  `export_nla` writes:

* AV: a complete `*ForCausalLM` directory (config, sharded safetensors, tokenizer files) plus
  `nla_meta.yaml`;
* AR: `config.json` with `num_hidden_layers = K+1`, the truncated backbone (embeddings and
  decoder layers 0..K; no final norm, no LM head: read the AR at the output of layer K) in
  `model*.safetensors`, the head in `value_head.safetensors` (a `Linear` state dict, key
  `weight`), tokenizer files and `nla_meta.yaml` - the layout of the released checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from nla_mcore.converters.checkpoint import (
    CheckpointMeta,
    layout_of_this_job,
    read_meta,
    save_checkpoint,
)
from nla_mcore.converters.hf_io import CheckpointError
from nla_mcore.converters.mcore_to_hf import CheckpointTensors, export_to_hf
from nla_mcore.models.ar import VALUE_HEAD
from nla_mcore.sidecar import (
    SIDECAR_BASENAME,
    Extraction,
    ModelSidecar,
    Provenance,
    make_tokens,
    model_sidecar_from_dict,
    model_sidecar_to_dict,
)

ROLES = ("av", "ar")


def make_model_sidecar(
    role: str,
    tokenizer,
    *,
    d_model: int,
    extraction_layer: int,
    injection_scale: float | None,
    mse_scale: float | None,
    base_checkpoint: str,
    stage: str = "init",
    training: dict | None = None,
) -> ModelSidecar:
    """The `nla_meta.yaml` of an AV (needs `injection_scale`) or AR model."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got '{role}'")
    if role == "av" and injection_scale is None:
        raise ValueError("an AV sidecar needs injection_scale (the norm vectors are injected at)")
    return ModelSidecar(
        role=role,
        d_model=d_model,
        stage=stage,
        base_checkpoint=base_checkpoint,
        extraction=Extraction(
            injection_scale=injection_scale if role == "av" else None, mse_scale=mse_scale
        ),
        tokens=make_tokens(tokenizer, ar_template=None if role == "av" else _ar_template()),
        extraction_layer_index=extraction_layer,
        training=training or {},
        provenance=Provenance.current(),
    )


def _ar_template() -> str:
    from nla_mcore.prompts import AR_PROMPT_TEMPLATE

    return AR_PROMPT_TEMPLATE


def save_nla_checkpoint(model, out_dir, *, recipe, sidecar: ModelSidecar, hf_dir=None) -> Path:
    """Save an AV (`NLAGPTModel`) or AR (`ARModel`) with its role and sidecar (every rank)."""
    return save_checkpoint(
        model,
        out_dir,
        nla_checkpoint_meta(recipe, sidecar.role),
        hf_dir=hf_dir,
        extra_files=sidecar_files(sidecar),
    )


def nla_checkpoint_meta(recipe, role: str) -> CheckpointMeta:
    """`nla_checkpoint.json` of an AV or AR checkpoint saved by this job."""
    return CheckpointMeta(
        family=recipe.family.name,
        num_layers=recipe.depth,
        dtype=str(recipe.dtype).removeprefix("torch."),
        hf_config=recipe.hf.raw,
        saved_layout=layout_of_this_job(),
        extra={"role": role, "backbone_only": role == "ar"},
    )


def sidecar_files(sidecar: ModelSidecar) -> dict[str, str]:
    """{`nla_meta.yaml`: its text} for `save_checkpoint`'s extra files."""
    import yaml

    text = yaml.safe_dump(model_sidecar_to_dict(sidecar), sort_keys=False, allow_unicode=True)
    return {SIDECAR_BASENAME: text}


def export_nla(ckpt_dir: str | Path, out_dir: str | Path, *, tokenizer_dir=None, **kwargs) -> Path:
    """Export an AV or AR checkpoint to an HF directory in the released layout."""
    import yaml

    meta: CheckpointMeta = read_meta(ckpt_dir)
    role = meta.extra.get("role")
    if role not in ROLES:
        raise CheckpointError(f"{ckpt_dir} is not an AV/AR checkpoint (role: {role!r})")
    sidecar_path = Path(ckpt_dir) / SIDECAR_BASENAME
    sidecar_text = sidecar_path.read_text()
    model_sidecar_from_dict(yaml.safe_load(sidecar_text), source=str(sidecar_path))  # validate
    extra_tensors = None
    if role == "ar":
        head = CheckpointTensors(Path(ckpt_dir) / "model").load([VALUE_HEAD], None)[VALUE_HEAD]
        extra_tensors = {"value_head.safetensors": {"weight": head}}
    return export_to_hf(
        ckpt_dir,
        out_dir,
        tokenizer_dir=tokenizer_dir,
        extra_tensors=extra_tensors,
        extra_files={SIDECAR_BASENAME: sidecar_text},
        **kwargs,
    )
