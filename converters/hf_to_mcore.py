"""HF -> Megatron-Core: load an HF checkpoint into this rank's model, or convert it to a checkpoint.

`load_hf_weights(model, hf_dir, recipe)` fills this rank's pipeline stage and tensor-parallel
slice straight from the safetensors files (each rank reads only its rows/columns; see
`mappings.py`).  Every HF tensor must be used by some rank and every parameter must be filled,
else all ranks fail together with the names (`raise_on_any_rank`).

`convert(hf_dir, out_dir, parallel, dtype)` is the `nla-mcore convert hf-to-mcore` rank program:
build the model without random init, load, save a dist-checkpoint (`checkpoint.py`).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from nla_mcore.converters.families import mappings_for
from nla_mcore.converters.hf_io import CheckpointError, HFReader
from nla_mcore.converters.mappings import canonical_name, find_mapping
from nla_mcore.models.sharding import TIED_OUTPUT, WORD_EMBEDDINGS, global_name, partition_dim

# HF tensors that carry no weights of ours (recomputed buffers)
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)
# Where `model.` of a *ForCausalLM checkpoint lives in other layouts (Gemma-3 multimodal, 4.x / 5.x)
MODEL_PREFIXES = ("model.", "language_model.model.", "model.language_model.")


class PrefixedReader:
    """An `HFReader` seen through CausalLM names (`model.…`, `lm_head.weight`)."""

    def __init__(self, reader: HFReader):
        self.reader = reader
        self.prefix = next((p for p in MODEL_PREFIXES if f"{p}embed_tokens.weight" in reader), None)
        if self.prefix is None:
            raise CheckpointError(
                f"{reader.directory}: no embed_tokens.weight under any of {MODEL_PREFIXES}"
            )
        self.used: set[str] = set()

    def actual(self, name: str) -> str:
        if name.startswith("model."):
            return self.prefix + name[len("model.") :]
        if name == "lm_head.weight" and self.prefix == "language_model.model.":
            return "language_model.lm_head.weight"
        return name

    def shape(self, name):
        return self.reader.shape(self.actual(name))

    def read(self, name, dim=None, start=0, stop=None):
        actual = self.actual(name)
        self.used.add(actual)
        return self.reader.read(actual, dim, start, stop)

    def expected_unused(self, tied: bool) -> set[str]:
        """Tensors we do not read: outside the language model (a multimodal checkpoint's vision
        tower), and a saved copy of a tied `lm_head`."""
        lm_roots = (self.prefix,) if tied else (self.prefix, "lm_head.", "language_model.lm_head.")
        return {n for n in self.reader.names() if not n.startswith(lm_roots)}


@torch.no_grad()
def load_hf_weights(model, hf_dir: str | Path, recipe, *, backbone_only: bool = False) -> None:
    """Fill this rank's `model` (built from `recipe`) from the HF checkpoint in `hf_dir`.

    A truncated recipe (`recipe.depth` < the checkpoint's layers) reads the first layers only;
    `backbone_only` (no final norm, no LM head: the AR, extraction) skips those tensors too.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from nla_mcore.runtime.distributed import raise_on_any_rank

    error, reader = None, None
    try:
        reader = PrefixedReader(HFReader(hf_dir))
        mappings = mappings_for(recipe.family.name, tied=recipe.hf.tie_word_embeddings)
        offset = get_transformer_layer_offset(model.config)
        tp_rank, tp_size = (
            ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_world_size(),
        )
        for name, param in model.named_parameters():
            canonical = canonical_name(global_name(name, offset))
            if canonical == TIED_OUTPUT and recipe.hf.tie_word_embeddings:
                canonical = WORD_EMBEDDINGS  # the last stage's copy of the tied embedding
            mapping, layer = find_mapping(mappings, canonical)
            piece = mapping.read_shard(
                reader,
                layer,
                dim=partition_dim(model, name),
                tp_rank=tp_rank,
                tp_size=tp_size,
                hf=recipe.hf,
            )
            if tuple(piece.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"'{canonical}' from HF {mapping.hf_names(layer)}: shape "
                    f"{tuple(piece.shape)} does not match the model's {tuple(param.shape)} "
                    "(does config.json match the weights?)"
                )
            param.copy_(piece.to(param.dtype))
    except Exception as err:  # noqa: BLE001 - reported on every rank by raise_on_any_rank below
        error = f"{type(err).__name__}: {err}"
    raise_on_any_rank(error, f"loading HF weights from {hf_dir}")
    skipped = _deliberately_skipped(reader, recipe.depth, backbone_only)
    _check_all_hf_tensors_used(reader, tied=recipe.hf.tie_word_embeddings, skipped=skipped)


def _deliberately_skipped(reader: PrefixedReader, depth: int, backbone_only: bool) -> set[str]:
    """HF tensors a truncated or backbone-only model does not hold."""
    skipped = set()
    for name in reader.reader.names():
        match = re.search(r"layers\.(\d+)\.", name)
        if match and int(match[1]) >= depth:
            skipped.add(name)
    if backbone_only:
        for name in ("model.norm.weight", "lm_head.weight"):
            skipped.add(reader.actual(name))
    return skipped


def _check_all_hf_tensors_used(reader: PrefixedReader, *, tied: bool, skipped: set[str]) -> None:
    used = [sorted(reader.used)]
    if torch.distributed.get_world_size() > 1:
        used = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(used, sorted(reader.used))
    all_used = set().union(*map(set, used))
    unused = sorted(
        n
        for n in set(reader.reader.names()) - all_used - reader.expected_unused(tied) - skipped
        if not n.endswith(IGNORED_HF_SUFFIXES)
    )
    if unused:
        raise CheckpointError(
            f"{reader.reader.directory}: {len(unused)} HF tensor(s) have no Megatron-Core "
            f"counterpart (unexpected for this architecture): {unused[:10]}"
        )


def convert(hf_dir: str, out_dir: str, parallel, *, dtype: str = "bfloat16", device: str = "auto"):
    """The hf-to-mcore rank program: build, load, save.  Run on tp·pp ranks."""
    from nla_mcore.converters.checkpoint import CheckpointMeta, layout_of_this_job, save_checkpoint
    from nla_mcore.models.build import build_model, make_recipe
    from nla_mcore.models.hf_config import load_hf_config
    from nla_mcore.runtime.distributed import init_distributed
    from nla_mcore.runtime.parallel import initialize_model_parallel, validate_layout

    env, _ = init_distributed(device)
    hf = load_hf_config(hf_dir)
    validate_layout(
        parallel,
        world_size=env.world_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        num_layers=hf.num_layers,
        vocab_size=hf.vocab_size,
    )
    initialize_model_parallel(parallel)
    recipe = make_recipe(hf, parallel, dtype=dtype, backend="local")
    model = build_model(recipe, perform_initialization=False)
    load_hf_weights(model, hf_dir, recipe)
    meta = CheckpointMeta(
        family=recipe.family.name,
        num_layers=recipe.depth,
        dtype=dtype,
        hf_config=hf.raw,
        saved_layout=layout_of_this_job(),
    )
    out = save_checkpoint(model, out_dir, meta, hf_dir=hf_dir)
    if env.rank == 0:
        print(
            f"[convert] {hf_dir} -> {out} ({recipe.family.name}, {recipe.depth} layers, {dtype}, "
            f"tp={parallel.tensor_parallel} pp={parallel.pipeline_parallel})"
        )


def main(argv: list[str] | None = None) -> None:
    from nla_mcore.runtime.parallel import ParallelConfig

    parser = argparse.ArgumentParser(prog="nla-mcore convert hf-to-mcore")
    parser.add_argument(
        "--hf", required=True, help="HF model directory (config.json + safetensors)"
    )
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the conversion")
    parser.add_argument(
        "--pp", type=int, default=1, help="pipeline-parallel size of the conversion"
    )
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 | float32 | float16")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp)
    convert(args.hf, args.out, parallel, dtype=args.dtype, device=args.device)


if __name__ == "__main__":
    main()
