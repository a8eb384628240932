"""`nla-mcore datagen`: the datagen pipeline with Megatron-Core extraction, one process per rank.

    nla-mcore datagen --config datagen.yaml model.hf_dir=/models/Qwen2.5-7B-Instruct \\
        parallel.tensor_parallel=2 nproc=8
    torchrun --nproc-per-node=8 -m nla_mcore.datagen.extract_main --config datagen.yaml ...

The config is `MCoreDatagenConfig`: every `DatagenConfig` key at the top level (the same YAML the
Hugging Face path, `pipeline.main_datagen`, reads) plus `model.*`, `parallel.*`, `device` and
`nproc`. Subclassing rather than nesting keeps one YAML for both paths; the price is that
`--help` shows the three inherited top-level keys (`output_dir`, `stages`, `explain_rl`) without
their docstrings, which `config.field_docs` reads from the subclass body only.

What each rank does (`run`):

1. check the layout for a K+1-block stack, `init_distributed`, `initialize_model_parallel`;
2. build blocks 0..K and load them from the HF directory (`MCoreActivationProvider.from_hf`);
3. `run_extract` on its data-parallel share; the writer of each replica is the rank at
   (last stage, tp 0, cp 0) (`writer_rank_info`), and the replica agrees on where to resume
   through the writer's manifest (`agree_with_writer`);
4. a barrier, then global rank 0 frees the model and runs `finish_pipeline` (split, explain,
   build: whichever are in `stages`) and writes `datagen-summary.json`. The other ranks return:
   they hold no collective open, so a long explain stage cannot time out a process group.

Without `extract` in `stages` no process group is made and only rank 0 works. Every rank reads
and writes `output_dir`, so multi-node jobs need a shared file system. A rank that raises exits
non-zero, and torchrun then stops the others (no rank is left waiting in a collective).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nla_mcore.datagen.datagen_config import DatagenConfig, require_run_fields
from nla_mcore.datagen.pipeline import PipelinePaths, PipelineSummary, finish_pipeline
from nla_mcore.runtime.parallel import LayoutError, ParallelConfig

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float32")
DEVICES = ("auto", "cuda", "cpu")


@dataclass(kw_only=True, slots=True)
class ExtractModelConfig:
    """The Megatron-Core model that extracts: blocks 0..K of the base model, from an HF directory."""

    hf_dir: str = ""
    """HF directory of the base model (config.json + safetensors + tokenizer); empty:
    extract.base_model, which must then be a local directory (nothing is downloaded)."""

    dtype: str = "bfloat16"
    """Weights and compute: bfloat16 (GPUs) or float32 (exact comparisons, CPU tests)."""

    backend: str = "auto"
    """Layer implementation: auto (Transformer Engine when it imports), te or local."""

    microbatches: int | None = None
    """Micro-batches each extract batch is cut into for the schedule; null: 1, or 2*pp with
    pipeline parallelism (so the stages overlap)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(
                f"model.dtype={self.dtype!r}: choose one of {list(DTYPES)} (float16 overflows "
                "Gemma's residual stream)"
            )
        if self.microbatches is not None and self.microbatches < 1:
            raise ValueError(f"model.microbatches={self.microbatches}: set 1 or more, or null")


@dataclass(kw_only=True, slots=True)
class MCoreDatagenConfig(DatagenConfig):
    """`nla-mcore datagen`: the datagen pipeline, extracting with Megatron-Core on every rank."""

    model: ExtractModelConfig = field(default_factory=ExtractModelConfig)
    """The extraction model (extract.layer picks K)."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP/PP/CP layout of each replica; data parallelism takes the rest of the ranks."""

    device: str = "auto"
    """auto (a GPU per rank if CUDA is visible, else the CPU), cuda, or cpu (gloo)."""

    nproc: int = 1
    """Local ranks to launch (torchrun) when not already running under a launcher."""

    def __post_init__(self) -> None:
        DatagenConfig.__post_init__(self)  # zero-argument super() fails in slots dataclasses
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r}: choose one of {list(DEVICES)}")
        if self.nproc < 1:
            raise ValueError(f"nproc={self.nproc}: set 1 or more")
        if not self.extract.base_model and self.model.hf_dir:
            self.extract.base_model = self.model.hf_dir


def launched_ranks(cfg: MCoreDatagenConfig) -> int:
    """Ranks for the CLI to launch: `nproc` to extract, one process for the later stages."""
    return cfg.nproc if "extract" in cfg.stages else 1


def model_dir(cfg: MCoreDatagenConfig) -> Path:
    """The local HF directory to load weights and tokenizer from."""
    path = Path(cfg.model.hf_dir or cfg.extract.base_model)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{path} is not a local HF model directory (no config.json): download the model "
            "and set model.hf_dir=/path/to/it"
        )
    return path


def run(cfg: MCoreDatagenConfig) -> PipelineSummary | None:
    """This rank's part of the job; rank 0 returns the pipeline summary, the others None."""
    from transformers import AutoTokenizer

    from nla_mcore.runtime.distributed import read_dist_env

    started = time.monotonic()
    require_run_fields(cfg)
    hf_dir = model_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    if "extract" in cfg.stages:
        extract_on_this_rank(cfg, hf_dir, tokenizer)
    if read_dist_env().rank != 0:
        return None
    return finish_pipeline(cfg, tokenizer, started=started)


def extract_on_this_rank(cfg: MCoreDatagenConfig, hf_dir: Path, tokenizer: Any) -> None:
    """Steps 1-3 of the module docstring, then a barrier (every shard is on disk after it)."""
    import torch

    from nla_mcore.datagen.extract import run_extract
    from nla_mcore.datagen.mcore_provider import (
        MCoreActivationProvider,
        agree_with_writer,
        writer_rank_info,
    )
    from nla_mcore.runtime.distributed import init_distributed, read_dist_env, set_seed
    from nla_mcore.runtime.parallel import initialize_model_parallel

    layer = check_extraction_layout(cfg, hf_dir, read_dist_env().world_size)
    env, _ = init_distributed(cfg.device)
    initialize_model_parallel(cfg.parallel)
    # A forward pass draws no random numbers, but Megatron-Core's blocks fork the model-parallel
    # RNG tracker under SP, and it must exist.
    set_seed(cfg.extract.seed)
    provider = MCoreActivationProvider.from_hf(
        hf_dir,
        layer=layer,
        parallel=cfg.parallel,
        dtype=cfg.model.dtype,
        backend=cfg.model.backend,
        microbatches=cfg.model.microbatches,
    )
    dp_rank, dp_size, is_writer = writer_rank_info()
    if is_writer and not provider.holds_vectors:
        raise RuntimeError(f"rank {env.rank} writes but holds no vectors (not the last stage)")
    run_extract(
        cfg.extract,
        provider,
        tokenizer,
        out_dir=PipelinePaths(Path(cfg.output_dir)).activations,
        dp_rank=dp_rank,
        dp_size=dp_size,
        is_writer=is_writer,
        agree_on_resume=agree_with_writer(dp_rank, is_writer),
    )
    del provider
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch.distributed.barrier()


def check_extraction_layout(cfg: MCoreDatagenConfig, hf_dir: Path, world_size: int) -> int:
    """K, after checking the layout can run blocks 0..K (before any process group is made).

    The K+1 blocks need not divide by pp: `build_model` splits them unevenly
    (`runtime.parallel.uneven_pipeline_split`), so only K+1 >= pp is required here and
    `validate_layout` checks the rest (heads, query groups, vocabulary, world size)."""
    from nla_mcore.models.hf_config import load_hf_config
    from nla_mcore.prompts import default_extraction_layer
    from nla_mcore.runtime.parallel import validate_layout

    hf = load_hf_config(hf_dir)
    layer = (
        default_extraction_layer(hf.num_layers) if cfg.extract.layer is None else cfg.extract.layer
    )
    pp = cfg.parallel.pipeline_parallel
    if layer + 1 < pp:
        raise LayoutError(
            f"extract.layer={layer} leaves {layer + 1} blocks for pipeline_parallel={pp} stages: "
            "lower parallel.pipeline_parallel"
        )
    validate_layout(
        cfg.parallel,
        world_size=world_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        num_layers=pp,  # any K+1 >= pp splits (see above)
        vocab_size=hf.vocab_size,
    )
    return layer


def main(argv: Sequence[str] | None = None) -> int:
    """Rank entry point: `[--config FILE.yaml] [key=value ...]`; 0 on success."""
    from nla_mcore.config import load_config
    from nla_mcore.runtime.distributed import read_dist_env

    args = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    if args[:1] == ["--config"]:
        config_path, args = args[1], args[2:]
    rank = read_dist_env().rank
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(message)s"
        )
    cfg = load_config(MCoreDatagenConfig, config_path, args)
    summary = run(cfg)
    if summary is not None:
        print(summary.format())
    return 0


def shut_down_process_group() -> None:
    """Destroy the process group before the process exits (NCCL warns otherwise)."""
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    code = main()
    shut_down_process_group()
    sys.exit(code)
