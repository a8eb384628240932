"""Config schemas of `nla-mcore sft-ar` and `nla-mcore sft-av` (one tree each, NLA.md defaults).

Both share `SFTConfig`; they differ in their model section (the AR's `mse_scale`, the AV's
`injection_scale`) and in the defaults of the original recipe (NLA.md "Training recipe"):
AV-SFT lr 2e-5 -> 2e-6 cosine, warm-up 50, batch 256, micro-batch 16; AR-SFT lr 2e-5, batch 256,
micro-batch 64 (we keep the same cosine to 2e-6 and warm-up; set optim.decay=constant for a
flat lr).  Fields every run must set (`output_dir`, `model.source`, `data.train_file`) are
checked by `require_run_fields` when a run starts, so the schema stays constructible for its
defaults and `--help`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nla_mcore.runtime.parallel import ParallelConfig
from nla_mcore.train.checkpointing import CheckpointConfig
from nla_mcore.train.health import HealthConfig
from nla_mcore.train.metrics import LoggingConfig
from nla_mcore.train.optim import OptimConfig

DTYPES = ("auto", "bfloat16", "float32")
DEVICES = ("auto", "cuda", "cpu")


@dataclass(kw_only=True, slots=True)
class SFTModelConfig:
    """The model being fine-tuned and how it is built."""

    source: str = ""
    """HF base model directory (config.json + safetensors + tokenizer), an nla-mcore checkpoint
    of this role (e.g. a previous run's checkpoints/step_N/ar), or a training step directory."""
    dtype: str = "auto"
    """auto (bfloat16 on GPUs with fp32 main params in the optimizer, float32 on the CPU),
    bfloat16 or float32."""
    backend: str = "auto"
    """Layer implementation: auto (Transformer Engine when it imports), te or local."""
    extraction_layer: int | None = None
    """K, the layer the vectors come from; null: the dataset sidecar's extraction.layer_index
    (all that are given must agree)."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}: one of {list(DTYPES)}")
        if self.extraction_layer is not None and self.extraction_layer < 0:
            raise ValueError(f"model.extraction_layer={self.extraction_layer}: set 0 or more")


@dataclass(kw_only=True, slots=True)
class ARModelConfig(SFTModelConfig):
    """The AR: the base model's first K+1 layers and an identity-initialised Linear(d, d) head."""

    mse_scale: float | None = None
    """Norm both vectors are rescaled to before the MSE; null: sqrt(d), which makes the loss
    2(1 - cos)."""

    def __post_init__(self):
        SFTModelConfig.__post_init__(self)  # zero-argument super() fails in slots dataclasses
        if self.mse_scale is not None and self.mse_scale <= 0:
            raise ValueError(f"model.mse_scale={self.mse_scale}: must be positive (or null)")


@dataclass(kw_only=True, slots=True)
class AVModelConfig(SFTModelConfig):
    """The AV: the full base model, the vector injected as the marker token's embedding."""

    injection_scale: float | None = None
    """Norm the vector is rescaled to before injection; null: the source's sidecar value (an
    nla-mcore AV), else a round number a bit above the mean norm of the training vectors
    (printed, and written into the model sidecar)."""

    def __post_init__(self):
        SFTModelConfig.__post_init__(self)
        if self.injection_scale is not None and self.injection_scale <= 0:
            raise ValueError(f"model.injection_scale={self.injection_scale}: must be positive")


@dataclass(kw_only=True, slots=True)
class SFTDataConfig:
    """The training file datagen built, and the held-out evaluation set."""

    train_file: str = ""
    """The split's parquet (ar_sft.parquet / av_sft.parquet) with its .nla_meta.yaml sidecar."""
    eval_file: str = ""
    """A separate evaluation parquet of the same stage; empty: hold out eval_fraction of the
    training documents (by a hash of doc_id, so no document is in both)."""
    eval_fraction: float = 0.02
    """Share of training documents held out when eval_file is empty (0: no evaluation set)."""
    eval_max_samples: int = 1024
    """At most this many evaluation samples (a seeded choice)."""
    max_length: int | None = None
    """Longest sample in tokens (prompt + target); longer rows are an error, or skipped; null:
    min(2048, the model's max_position_embeddings)."""
    skip_bad_rows: bool = False
    """Drop (and count) rows with bad vectors, prompts or lengths instead of refusing the file."""
    pad_multiple: int = 16
    """Micro-batches are padded to a multiple of this (raised to fit CP and SP when needed)."""

    def __post_init__(self):
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction={self.eval_fraction}: in [0, 1)")
        if (
            (self.max_length is not None and self.max_length < 8)
            or self.pad_multiple < 1
            or self.eval_max_samples < 1
        ):
            raise ValueError(
                "data.max_length >= 8, data.pad_multiple >= 1 and "
                "data.eval_max_samples >= 1 are required"
            )


@dataclass(kw_only=True, slots=True)
class ScheduleConfig:
    """How long and on how much data per step."""

    steps: int | None = None
    """Optimizer steps; null: epochs x training samples / global_batch_size (rounded up)."""
    epochs: float = 1.0
    """Passes over the training set when steps is null."""
    global_batch_size: int = 256
    """Samples per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 16
    """Samples per forward/backward on one rank (gradient accumulation makes up the rest)."""
    seed: int = 1234
    """Seeds the data order (a pure function of seed, epoch and index) and the RNGs."""
    eval_every: int = 100
    """Evaluate every this many steps, before training and at the end (0: never)."""
    stop_after: int | None = None
    """Stop after this step with a checkpoint, though the schedule runs to `steps` (for jobs
    shorter than the run); the next run with checkpoint.resume=auto continues from there."""

    def __post_init__(self):
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"train.steps={self.steps}: set 1 or more, or null")
        if self.epochs <= 0 or self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError(
                "train.epochs > 0, train.global_batch_size >= 1 and "
                "train.micro_batch_size >= 1 are required"
            )
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if self.eval_every < 0:
            raise ValueError(f"train.eval_every={self.eval_every}: set 0 or more")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"train.stop_after={self.stop_after}: set 1 or more, or null")


@dataclass(kw_only=True, slots=True)
class ExportConfig:
    """The Hugging Face export of the final checkpoint (rank 0, streaming, layer by layer)."""

    enabled: bool = True
    """Export at the end of the run."""
    dir: str = ""
    """Output directory; empty: output_dir/hf."""


@dataclass(kw_only=True, slots=True)
class SFTConfig:
    """Settings shared by both SFT stages."""

    output_dir: str = ""
    """Run directory: config.yaml, metrics.jsonl, curves.png, checkpoints/, hf/ (the export)."""
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    """Training and evaluation data."""
    train: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Steps, batch sizes, seed, evaluation cadence."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP/PP/CP layout; data parallelism takes the rest of the ranks."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Progress, metrics.jsonl, TensorBoard, the PNG."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """Loss-spike warnings."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Hugging Face export at the end."""
    device: str = "auto"
    """auto (a GPU per rank if CUDA is visible, else the CPU), cuda, or cpu (gloo)."""
    nproc: int = 1
    """Local ranks to launch (torchrun) when not already running under a launcher."""

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r}: one of {list(DEVICES)}")
        if self.nproc < 1:
            raise ValueError(f"nproc={self.nproc}: set 1 or more")


@dataclass(kw_only=True, slots=True)
class ARSFTConfig(SFTConfig):
    """`nla-mcore sft-ar`: supervised training of the AR on ar_sft (explanation -> vector)."""

    model: ARModelConfig = field(default_factory=ARModelConfig)
    """The AR and its base."""
    train: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(micro_batch_size=64))
    """Steps, batch sizes, seed, evaluation cadence."""


@dataclass(kw_only=True, slots=True)
class AVSFTConfig(SFTConfig):
    """`nla-mcore sft-av`: supervised training of the AV on av_sft (vector -> explanation)."""

    model: AVModelConfig = field(default_factory=AVModelConfig)
    """The AV and its base."""


def require_run_fields(cfg: SFTConfig) -> None:
    """The fields a run cannot default (checked before any rank starts)."""
    missing = [
        key
        for key, value in (
            ("output_dir", cfg.output_dir),
            ("model.source", cfg.model.source),
            ("data.train_file", cfg.data.train_file),
        )
        if not value
    ]
    from nla_mcore.config import ConfigError

    if missing:
        raise ConfigError(f"set {', '.join(missing)} (e.g. {missing[0]}=/path/...)")
    for key, path in (
        ("model.source", cfg.model.source),
        ("data.train_file", cfg.data.train_file),
        ("data.eval_file", cfg.data.eval_file),
    ):
        if path and not Path(path).exists():
            raise ConfigError(f"{key}={path}: no such file or directory")
