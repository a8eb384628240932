"""nla-mcore checkpoints: a Megatron-Core dist-checkpoint plus what is needed to rebuild the model.

Layout of a checkpoint directory:

    nla_checkpoint.json   format version, family, number of layers, dtype, the layout it was
                          saved under, extras (e.g. an AR head) - written last
    hf/                   the base model's config.json and tokenizer files (for export)
    model/                Megatron-Core `dist_checkpointing` (torch_dist) of the model weights

The weights are saved with `dist_checkpointing.save(model.sharded_state_dict())`: every rank
writes its shards, and any later layout (other TP/PP) loads them through
`dist_checkpointing.load` (resharding).  Transformer Engine `_extra_state` entries are not
saved (they hold only FP8 metadata and would be pickled objects).  The directory is written
under a temporary name and renamed by rank 0 after all ranks finished: a crash leaves no
directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nla_mcore.converters.hf_io import CheckpointError, copy_tokenizer_files, replace_directory

META = "nla_checkpoint.json"
FORMAT_VERSION = 1


@dataclass
class CheckpointMeta:
    """What `nla_checkpoint.json` records."""

    family: str
    num_layers: int
    dtype: str
    hf_config: dict[str, Any]
    saved_layout: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT_VERSION


def read_meta(ckpt_dir: str | Path) -> CheckpointMeta:
    """The metadata of a complete checkpoint (error if the directory is not one)."""
    path = Path(ckpt_dir) / META
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a complete nla-mcore checkpoint (no {META})")
    raw = json.loads(path.read_text())
    if raw.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {raw.get('format')} is not {FORMAT_VERSION}")
    return CheckpointMeta(**raw)


def model_sharded_state_dict(model) -> dict:
    """The model's sharded state dict without TE `_extra_state` entries."""
    sharded = model.sharded_state_dict()
    return {k: v for k, v in sharded.items() if not k.endswith("._extra_state")}


def save_checkpoint(
    model,
    out_dir: str | Path,
    meta: CheckpointMeta,
    *,
    hf_dir: str | Path | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save this rank's shards of `model` into the checkpoint `out_dir` (call on every rank).

    `extra_files` (name -> text) are written by rank 0 beside the metadata (e.g. a sidecar)."""
    from megatron.core import dist_checkpointing

    out = Path(out_dir).resolve()
    temp = _shared_temp_dir(out)
    dist_checkpointing.save(model_sharded_state_dict(model), str(temp / "model"))
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        write_checkpoint_files(temp, meta, hf_dir=hf_dir, extra_files=extra_files)
        replace_directory(temp, out)
    torch.distributed.barrier()
    return out


def write_checkpoint_files(
    directory: Path, meta: CheckpointMeta, *, hf_dir=None, extra_files: dict[str, str] | None = None
) -> None:
    """Everything of a checkpoint but the weights (one process): `hf/` (config and tokenizer
    files), the extra files, and `nla_checkpoint.json` last."""
    (directory / "hf").mkdir(exist_ok=True)
    (directory / "hf" / "config.json").write_text(json.dumps(meta.hf_config, indent=2))
    if hf_dir is not None:
        copy_tokenizer_files(hf_dir, directory / "hf")
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text)
    (directory / META).write_text(json.dumps(asdict(meta), indent=2))


def load_checkpoint(model, ckpt_dir: str | Path) -> None:
    """Load the weights of `ckpt_dir` into this rank's `model` (any TP/PP layout)."""
    from megatron.core import dist_checkpointing

    model_dir = Path(ckpt_dir) / "model"
    read_meta(ckpt_dir)
    sharded = model_sharded_state_dict(model)
    check_shapes(sharded, model_dir)
    state = dist_checkpointing.load(sharded, str(model_dir))
    missing = model.load_state_dict(state, strict=False).missing_keys
    missing = [k for k in missing if not k.endswith("._extra_state")]
    if missing:
        raise CheckpointError(f"{ckpt_dir}: no weights for {missing}")


def check_shapes(sharded: dict, model_dir: Path) -> None:
    """Compare global shapes before loading, so a config mismatch names the tensors."""
    from megatron.core import dist_checkpointing

    saved = dist_checkpointing.load_tensors_metadata(str(model_dir))
    problems = []
    for item in sharded.values():
        shape, key = getattr(item, "global_shape", None), getattr(item, "key", None)
        if shape is None:
            continue
        if key not in saved:
            problems.append(f"'{key}' is not in the checkpoint")
        elif tuple(saved[key].global_shape) != tuple(shape):
            problems.append(
                f"'{key}': checkpoint {tuple(saved[key].global_shape)} vs model {tuple(shape)}"
            )
    if problems:
        raise CheckpointError(
            f"checkpoint {model_dir.parent} does not fit the model (config mismatch?):\n  "
            + "\n  ".join(problems[:20])
        )


def _shared_temp_dir(out: Path) -> Path:
    """A temp directory beside `out`, created by rank 0 and shared with all ranks."""
    name = [None]
    if torch.distributed.get_rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        name[0] = tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        (Path(name[0]) / "model").mkdir()
    torch.distributed.broadcast_object_list(name, src=0)
    return Path(name[0])


def layout_of_this_job() -> dict[str, int]:
    """The TP/PP/CP/world sizes of the running job (recorded in the metadata)."""
    from megatron.core import parallel_state as ps

    return dict(
        tensor_parallel=ps.get_tensor_model_parallel_world_size(),
        pipeline_parallel=ps.get_pipeline_model_parallel_world_size(),
        context_parallel=ps.get_context_parallel_world_size(),
        world_size=torch.distributed.get_world_size(),
    )


def checkpoint_exists(path: str | Path) -> bool:
    return (Path(path) / META).is_file() and os.path.isdir(Path(path) / "model")


def recipe_from_meta(meta: CheckpointMeta, parallel, *, dtype: str | None = None, backend="auto"):
    """The `ModelRecipe` that rebuilds a checkpoint's model under `parallel`."""
    from nla_mcore.models.build import make_recipe
    from nla_mcore.models.hf_config import parse_hf_config

    hf = parse_hf_config(meta.hf_config)
    return make_recipe(
        hf, parallel, dtype=dtype or meta.dtype, backend=backend, num_layers=meta.num_layers
    )
