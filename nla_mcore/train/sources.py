"""Where a trained model starts from: an HF base model or an nla-mcore checkpoint of its role.

`resolve_source(path, role)` accepts
* an HF model directory (`config.json` + safetensors + tokenizer): the base model, or an
  exported / released AV (its `nla_meta.yaml` is kept: injection scale, marker, templates);
* an nla-mcore AV/AR checkpoint (`nla_checkpoint.json`, e.g. a previous run's
  `checkpoints/step_N/ar`): its weights, including a trained AR head, and its sidecar;
* a training step directory (`checkpoints/step_N`, holding `train_state.json`): its `role`
  subdirectory.
and refuses, naming the path, anything else (an AR checkpoint given to the AV, an exported AR
directory, which our loaders read as HF only through its base layout, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nla_mcore.converters.hf_io import CheckpointError
from nla_mcore.sidecar import ModelSidecar, read_model_sidecar


@dataclass(frozen=True)
class ModelSource:
    path: Path
    kind: str
    """hf | nla"""
    hf_dir: Path
    """config.json and tokenizer files."""
    sidecar: ModelSidecar | None
    """The nla-mcore checkpoint's sidecar (None for an HF base)."""

    def weights(self) -> dict:
        """Keyword arguments of `models.nla.build_av` / `build_ar` that load these weights."""
        return {"hf_dir": self.hf_dir} if self.kind == "hf" else {"ckpt_dir": self.path}

    @property
    def base_checkpoint(self) -> str:
        """The base model a fine-tuned source derives from (its own path for an HF base)."""
        if self.sidecar is not None and self.sidecar.base_checkpoint:
            return self.sidecar.base_checkpoint
        return str(self.path)


def resolve_source(path: str | Path, role: str) -> ModelSource:
    """What `path` is, for a model of `role` ('av' | 'ar')."""
    from nla_mcore.converters.checkpoint import META, read_meta
    from nla_mcore.train.checkpointing import STATE_FILE

    path = Path(path).resolve()
    if (path / STATE_FILE).is_file():
        if not (path / role).is_dir():
            raise CheckpointError(f"model.source={path}: this training checkpoint has no '{role}'")
        path = path / role
    if (path / META).is_file():
        meta = read_meta(path)
        found = meta.extra.get("role")
        if found != role:
            raise CheckpointError(
                f"model.source={path} is an nla-mcore checkpoint of role {found!r}, not {role!r}"
            )
        return ModelSource(path, "nla", path / "hf", read_model_sidecar(path))
    if (path / "config.json").is_file():
        if (path / "value_head.safetensors").is_file():
            raise CheckpointError(
                f"model.source={path} is an exported AR (value_head.safetensors): train from its "
                "nla-mcore checkpoint (checkpoints/step_N/ar) or from the HF base model"
            )
        sidecar = None
        if (path / "nla_meta.yaml").is_file():  # an exported (or released) AV: keep its sidecar
            sidecar = read_model_sidecar(path)
            if sidecar.role != role:
                raise CheckpointError(
                    f"model.source={path}: its nla_meta.yaml says role {sidecar.role!r}, not "
                    f"{role!r}"
                )
        return ModelSource(path, "hf", path, sidecar)
    raise CheckpointError(
        f"model.source={path}: neither an HF model directory (config.json) nor an nla-mcore "
        "checkpoint (nla_checkpoint.json)"
    )
