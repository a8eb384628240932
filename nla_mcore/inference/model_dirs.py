"""Opening an exported AV or AR directory, ours or the original project's released layout.

A directory is usable when its `nla_meta.yaml` (schema v1 with `actor`/`critic`, or v2) has the
right role and agrees with the live tokenizer and config.  Every NLA.md failure mode that can
be seen from the files is refused here with a message that names it (or warned about, where
the files cannot be sure):

* the marker absent or split into several tokens, or its neighbours drifted (template drift):
  `sidecar.check_marker`; the AR suffix drifted: `sidecar.check_ar_suffix`;
* a double BOS in a prompt, or no BOS in the AR prompt of a family that has one (Gemma's FVE
  fell from 0.77 to 0.31 without it);
* Gemma's sqrt(d) missing from the loaded embedding (the model class lost the scale);
* an AR with K layers instead of K+1 (its FVE was capped at ~0.32), or any other depth;
* an AR head left randomly initialised (warned: its diagonal is near 0, not near 1).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nla_mcore.sidecar import ModelSidecar, read_model_sidecar

log = logging.getLogger(__name__)

ROLE_NAMES = {"av": "an AV (activation verbalizer)", "ar": "an AR (activation reconstructor)"}


class NLAModelError(ValueError):
    """An AV/AR directory that cannot be used as asked; the message names the failure mode."""


@dataclass
class ModelDirectory:
    path: Path
    sidecar: ModelSidecar
    hf: Any
    """`models.hf_config.HFModelConfig` of its config.json."""
    family: Any
    tokenizer: Any


def open_model_dir(path: str | Path, role: str) -> ModelDirectory:
    """Read and check the sidecar, config and tokenizer of an exported `role` directory."""
    from transformers import AutoTokenizer

    from nla_mcore.models.hf_config import load_hf_config
    from nla_mcore.models.registry import family_for

    path = Path(path)
    if not (path / "config.json").is_file():
        raise NLAModelError(f"{path}: not a model directory (no config.json)")
    if not (path / "nla_meta.yaml").is_file():
        raise NLAModelError(
            f"{path}: no nla_meta.yaml; an NLA {role.upper()} carries its injection scale, "
            "marker and templates there (nothing is guessed)"
        )
    sidecar = read_model_sidecar(path)
    if sidecar.role != role:
        raise NLAModelError(
            f"{path} is {ROLE_NAMES[sidecar.role]}, but {ROLE_NAMES[role]} was expected"
        )
    hf = load_hf_config(path)
    if sidecar.d_model != hf.hidden_size:
        raise NLAModelError(
            f"{path}: nla_meta.yaml says d_model={sidecar.d_model}, config.json "
            f"hidden_size={hf.hidden_size}"
        )
    return ModelDirectory(path, sidecar, hf, family_for(hf), AutoTokenizer.from_pretrained(path))


def check_bos(ids: list[int], tokenizer, what: str, *, required: bool) -> None:
    """One BOS at the start when the tokenizer has one (and `required`), never two."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return
    count = ids.count(bos)
    if count > 1:
        raise NLAModelError(
            f"the {what} holds {count} BOS tokens (double BOS: the template already renders "
            "one and something added another)"
        )
    if required and (not ids or ids[0] != bos):
        raise NLAModelError(
            f"the {what} does not start with the BOS token (id {bos}); NLA.md: without it "
            "Gemma's FVE fell from 0.77 to 0.31 (check add_bos_token in tokenizer_config.json)"
        )


def check_embedding_scale(model, directory: ModelDirectory, token_id: int) -> None:
    """The loaded input embedding multiplies by sqrt(d) exactly when the family does."""
    embedding = model.get_input_embeddings()
    ids = torch.tensor([[token_id]], device=embedding.weight.device)
    with torch.no_grad():
        looked_up = embedding(ids)[0, 0].float()
        raw = embedding.weight[token_id].float()
        ratio = float(looked_up.norm() / raw.norm().clamp_min(1e-12))
    expected = directory.hf.hidden_size**0.5 if directory.family.scale_embeddings else 1.0
    if abs(ratio / expected - 1) > 1e-2:
        raise NLAModelError(
            f"{directory.path}: the loaded input embedding scales token rows by {ratio:.4g}, the "
            f"{directory.family.name} family by {expected:.4g} "
            f"({'missing sqrt(d)' if expected > 1 else 'an unexpected scale'}): the prompt would "
            "reach the AV at another scale than in training"
        )


def check_ar_depth(directory: ModelDirectory) -> int:
    """K, after checking the AR has exactly K+1 decoder layers."""
    k = directory.sidecar.extraction_layer_index
    layers = directory.hf.num_layers
    if k is None:
        raise NLAModelError(f"{directory.path}: nla_meta.yaml has no extraction layer index K")
    if layers == k:
        raise NLAModelError(
            f"{directory.path}: the AR has {layers} decoder layers = K; it must have K+1 = "
            f"{k + 1} (the vector is the output of block K; NLA.md: an AR with K layers capped "
            "FVE at ~0.32)"
        )
    if layers != k + 1:
        raise NLAModelError(
            f"{directory.path}: the AR has {layers} decoder layers, it must have K+1 = {k + 1}"
        )
    return k


def check_value_head(weight_DD: torch.Tensor, directory: ModelDirectory) -> None:
    d = directory.hf.hidden_size
    if tuple(weight_DD.shape) != (d, d):
        raise NLAModelError(
            f"{directory.path}/value_head.safetensors: weight of shape {tuple(weight_DD.shape)}, "
            f"expected ({d}, {d})"
        )
    diagonal = float(weight_DD.float().diagonal().mean())
    if abs(diagonal) < 0.1:
        log.warning(
            "%s: the value head looks randomly initialised (mean diagonal %.3f; an identity-"
            "initialised head keeps it near 1): NLA.md measured a worse start with a random head",
            directory.path,
            diagonal,
        )


@contextlib.contextmanager
def quiet_transformers():
    """transformers' weight-loading bar and load report off (the checks here say what matters)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """auto: the GPU in bf16 when there is one, else the CPU in fp32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise NLAModelError(f"dtype must be auto or one of {sorted(dtypes)}, got {dtype!r}")
    return torch.device(device), dtypes[dtype]
