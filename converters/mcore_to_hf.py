"""Megatron-Core -> HF: stream a checkpoint of any layout into a Hugging Face model directory.

One process (no process group needed) reads the dist-checkpoint one layer at a time (a PyTorch
DCP load of just that layer's box of each stacked tensor, `RegionPlanner`), turns each full Megatron-Core tensor into its HF
tensors (`mappings.py`), and streams them into `model-0000i-of-0000n.safetensors` shards.
Peak memory is one layer plus one shard, whatever the model size and the layout it was saved
under.  The output is built in a temp directory and renamed into place at the end
(`hf_io.atomic_directory`).

`export_to_hf(..., extra_tensors=, extra_files=, config_overrides=)` lets the AV/AR exporters add
their own tensors (e.g. the AR's `value_head.safetensors`), sidecars and config changes.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from nla_mcore.converters.checkpoint import read_meta
from nla_mcore.converters.families import mappings_for
from nla_mcore.converters.hf_io import (
    CheckpointError,
    ShardedWriter,
    atomic_directory,
    copy_tokenizer_files,
)
from nla_mcore.converters.mappings import Mapping
from nla_mcore.models.hf_config import parse_hf_config
from nla_mcore.models.registry import get_family

DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def stacked_key(mapping: Mapping) -> str:
    """The dist-checkpoint key of a mapping (layers are stacked along a leading axis)."""
    return mapping.mcore.replace("{layer}.", "")


class RegionPlanner(LoadPlanner):
    """A PyTorch DCP load planner that reads only given regions of saved tensors.

    Megatron-Core's torch_dist checkpoints are PyTorch DCP checkpoints whose layer parameters
    are stacked along a leading axis.  DCP's default planner loads whole tensors; this one asks
    for a box (`offsets`, `sizes`) of each tensor, e.g. one layer, and DCP's resharding helper
    works out which saved chunks (written by any TP/PP layout) cover it.
    """

    def __init__(self, regions: dict[str, tuple[tuple[int, ...], torch.Tensor]]):
        self.regions = regions  # fqn -> (offsets, destination tensor of the region's size)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        requests = []
        for fqn, (offsets, dest) in self.regions.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            md = self.metadata.state_dict_metadata[fqn]
            requests += create_read_items_for_chunk_list(fqn, md, [chunk])
        return LoadPlan(requests)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, new_plan):
        return new_plan

    def load_bytes(self, read_item, value):
        raise CheckpointError(f"unexpected non-tensor item '{read_item.dest_index.fqn}'")

    def resolve_tensor(self, read_item):
        view = self.regions[read_item.dest_index.fqn][1]
        for dim, (start, length) in enumerate(
            zip(read_item.dest_offsets, read_item.lengths, strict=True)
        ):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item, tensor):
        return None


class CheckpointTensors:
    """Reads full (TP=1) tensors, or one layer of stacked tensors, from a dist-checkpoint."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.metadata = FileSystemReader(str(model_dir)).read_metadata().state_dict_metadata

    def load(self, keys: list[str], layer: int | None) -> dict[str, torch.Tensor]:
        regions = {}
        for key in keys:
            if key not in self.metadata:
                raise CheckpointError(f"tensor '{key}' is missing from {self.model_dir}")
            md = self.metadata[key]
            shape, dtype = tuple(md.size), md.properties.dtype
            if layer is None:
                regions[key] = ((0,) * len(shape), torch.empty(shape, dtype=dtype))
            else:
                region = torch.empty((1, *shape[1:]), dtype=dtype)
                regions[key] = ((layer,) + (0,) * (len(shape) - 1), region)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(
                {},
                storage_reader=FileSystemReader(str(self.model_dir)),
                planner=RegionPlanner(regions),
                no_dist=True,
            )
        return {k: t if layer is None else t[0] for k, (_, t) in regions.items()}


def export_config(meta, *, num_layers: int, dtype: str, overrides: dict | None) -> dict:
    """config.json of the exported model: the base config (text part), this depth and dtype."""
    raw = meta.hf_config
    config = dict(raw["text_config"]) if isinstance(raw.get("text_config"), dict) else dict(raw)
    family = get_family(meta.family)
    if isinstance(raw.get("text_config"), dict):
        config["model_type"] = family.hf_model_types[0]
        config.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", True))
    config["architectures"] = [family.hf_architecture]
    config["num_hidden_layers"] = num_layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:num_layers]
    config["torch_dtype"] = dtype
    config.update(overrides or {})
    return config


def export_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    extra_files: dict[str, str | bytes] | None = None,
    config_overrides: dict | None = None,
    max_shard_bytes: int = 5 * 2**30,
    on_progress: Callable[[str], None] | None = None,
) -> Path:
    """Write `ckpt_dir` as an HF model directory at `out_dir`; returns `out_dir`."""
    meta = read_meta(ckpt_dir)
    hf = parse_hf_config(meta.hf_config)
    mappings = mappings_for(
        meta.family,
        tied=hf.tie_word_embeddings,
        backbone_only=meta.extra.get("backbone_only", False),
    )
    tensors = CheckpointTensors(Path(ckpt_dir) / "model")
    with atomic_directory(out_dir) as temp:
        writer = ShardedWriter(temp, max_shard_bytes=max_shard_bytes)
        _write_tensors(writer, tensors, mappings, hf, meta.num_layers, on_progress)
        writer.close()
        config = export_config(
            meta, num_layers=meta.num_layers, dtype=meta.dtype, overrides=config_overrides
        )
        (temp / "config.json").write_text(json.dumps(config, indent=2))
        copy_tokenizer_files(Path(ckpt_dir) / "hf", temp)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, temp)
        for file, named in (extra_tensors or {}).items():
            save_file({k: v.contiguous() for k, v in named.items()}, str(temp / file))
        for file, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(temp / file, mode) as f:
                f.write(content)
    return Path(out_dir)


def _write_tensors(writer, tensors, mappings, hf, num_layers, on_progress):
    globals_ = [m for m in mappings if not m.per_layer]
    per_layer = [m for m in mappings if m.per_layer]
    loaded = tensors.load([stacked_key(m) for m in globals_], None)
    for m in globals_:
        for name, t in m.to_hf(loaded[stacked_key(m)], None, hf).items():
            writer.add(name, t)
    for layer in range(num_layers):
        loaded = tensors.load([stacked_key(m) for m in per_layer], layer)
        for m in per_layer:
            for name, t in m.to_hf(loaded[stacked_key(m)], layer, hf).items():
                writer.add(name, t.clone())  # own the memory: views pin the whole layer
        if on_progress:
            on_progress(f"layer {layer + 1}/{num_layers}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nla-mcore convert mcore-to-hf")
    parser.add_argument("--ckpt", required=True, help="nla-mcore checkpoint directory")
    parser.add_argument("--out", required=True, help="output HF model directory")
    parser.add_argument("--tokenizer", help="copy tokenizer files from this directory too")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    meta = read_meta(args.ckpt)
    with tqdm(total=meta.num_layers, desc="export", unit="layer") as bar:
        out = export_to_hf(
            args.ckpt,
            args.out,
            tokenizer_dir=args.tokenizer,
            max_shard_bytes=int(args.max_shard_gb * 2**30),
            on_progress=lambda _: bar.update(),
        )
    print(f"[convert] {args.ckpt} -> {out}")


if __name__ == "__main__":
    main()
