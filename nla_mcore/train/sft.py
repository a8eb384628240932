"""`nla-mcore sft-ar` and `nla-mcore sft-av`: supervised training of the AR and the AV.

    nla-mcore sft-ar model.source=/models/Qwen2.5-7B-Instruct data.train_file=out/ar_sft.parquet \\
        output_dir=runs/ar nproc=8 parallel.tensor_parallel=2
    nla-mcore sft-av model.source=/models/Qwen2.5-7B-Instruct data.train_file=out/av_sft.parquet \\
        output_dir=runs/av model.injection_scale=150 nproc=8

One task class serves both stages (`SFTTask`); what differs is a small `Stage`: the AR's
micro-batches (prompt -> read-out index, target vector) and normalised-MSE loss through the
fused kernel, with FVE on the held-out set; the AV's micro-batches (prompt with the injected
vector + target) and next-token loss on the target tokens, with the held-out loss and, as a
control, the same loss with the vectors shuffled across samples (an AV that reads its vector
does worse on someone else's).  The loop (`loop.train`) does the rest.

What a rank does (`run`): read and check the data and the model source (every rank, the same
way, so bad input fails everywhere before any collective), create the process groups, build
the model stage (from the source, or empty when resuming), wrap it in DDP with the distributed
optimizer, train, and on rank 0 export the final checkpoint to Hugging Face and draw the curves.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from nla_mcore.data.batching import padding_fraction
from nla_mcore.data.sft_batches import ar_microbatch, av_microbatch
from nla_mcore.data.sft_files import DataError
from nla_mcore.train.checkpointing import Checkpointer, TrainedModel
from nla_mcore.train.engine import forward_backward
from nla_mcore.train.flops import train_flops
from nla_mcore.train.health import explain_nonfinite
from nla_mcore.train.optim import optimizer_step
from nla_mcore.train.sft_data import SFTData, describe_samples

log = logging.getLogger(__name__)

ROLES = {"ar": "sft-ar", "av": "sft-av"}
DEFAULT_MAX_LENGTH = 2048


# --- the two stages ------------------------------------------------------------------------------


@dataclass
class ARStage:
    """AR-SFT: explanation -> vector, normalised MSE (the fused kernel), FVE on held-out data."""

    mse_scale: float | None
    role: str = "ar"
    split: str = "ar_sft"
    loss_key: str = "ar_mse"

    def forward_step(self):
        from nla_mcore.train.nla_steps import ar_forward_step

        return partial(ar_forward_step, mse_scale=self.mse_scale)

    def microbatch(self, data, samples, length, pad_id, vectors_ND=None) -> dict:
        return ar_microbatch(data, samples, length, pad_id)

    def flops(self, hf, lengths, depth) -> float:
        d = hf.hidden_size
        return train_flops(hf, lengths, num_layers=depth, lm_head=False, extra_params=d * d)

    def eval_metrics(self, task: SFTTask) -> dict:
        """Held-out mse_nrm, its mean cos, and FVE against the rawvar baseline (eval.scores)."""
        from nla_mcore.eval.scores import fve

        mse = task.eval_loss()
        d = task.hf.hidden_size
        scale = self.mse_scale or math.sqrt(d)
        return {
            "mse_nrm": mse,
            "fve": fve(mse, task.data.eval.vectors_ND, scale, "rawvar"),
            "cos": 1.0 - mse * d / (2 * scale**2),  # mse_nrm = 2 s^2 (1 - cos) / d
        }


@dataclass
class AVStage:
    """AV-SFT: vector -> explanation, next-token loss on the target with the vector injected."""

    tokens: object
    """`sidecar.Tokens` of the data (marker id and neighbours)."""
    vocab_size: int
    injection_scale: float
    role: str = "av"
    split: str = "av_sft"
    loss_key: str = "lm_loss"

    def forward_step(self):
        from nla_mcore.train.lm import lm_forward_step

        return lm_forward_step

    def microbatch(self, data, samples, length, pad_id, vectors_ND=None) -> dict:
        return av_microbatch(
            data,
            samples,
            length,
            pad_id,
            tokens=self.tokens,
            vocab_size=self.vocab_size,
            injection_scale=self.injection_scale,
            vectors_ND=vectors_ND,
        )

    def flops(self, hf, lengths, depth) -> float:
        return train_flops(hf, lengths, num_layers=depth, lm_head=True)

    def eval_metrics(self, task: SFTTask) -> dict:
        values = {"loss": task.eval_loss()}
        if len(task.data.eval) > 1:  # every sample gets another's vector (a single cycle)
            shuffled = np.roll(task.data.eval.vectors_ND, 1, axis=0)
            values["loss_shuffled"] = task.eval_loss(vectors_ND=shuffled)
        return values


# --- the task the loop runs ----------------------------------------------------------------------


@dataclass
class SFTTask:
    """One SFT stage of one model on this rank (see `loop.Task`)."""

    stage: ARStage | AVStage
    trained: TrainedModel
    data: SFTData
    hf: object
    depth: int
    total_steps: int
    device: torch.device
    dp_rank: int
    training_info: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return ROLES[self.stage.role]

    @property
    def models(self) -> list[TrainedModel]:
        return [self.trained]

    def train_step(self, step: int) -> dict:
        plans = self.data.plan(step)
        mine = plans[self.dp_rank]
        microbatches = self._microbatches(self.data.train, mine)
        model, optimizer = self.trained.model, self.trained.optimizer
        optimizer.zero_grad()
        loss = forward_backward(
            model,
            self.stage.forward_step(),
            microbatches,
            seq_length=max(mine.lengths),
            loss_key=self.stage.loss_key,
        )
        update = optimizer_step(
            optimizer,
            self.trained.scheduler,
            loss=loss.loss,
            explain_failure=lambda value, norm: explain_nonfinite(
                step,
                value,
                norm,
                loss.local_sums,
                [describe_samples(self.data.train, s) for s in mine.samples],
            ),
        )
        lengths = self.data.train.lengths_N[np.concatenate([s for p in plans for s in p.samples])]
        return {
            "loss": loss.loss,
            "lr": update.lr,
            "grad_norm": update.grad_norm,
            "tokens": int(lengths.sum()),
            "padding": padding_fraction(plans),
            "flops": self.stage.flops(self.hf, lengths.tolist(), self.depth),
        }

    def evaluate(self, step: int) -> dict:
        if self.data.eval is None:
            return {}
        return self.stage.eval_metrics(self)

    def eval_loss(self, vectors_ND=None) -> float:
        """Mean loss over the held-out set (forward only; this rank's share, reduced)."""
        mine = self.data.eval_plan()[self.dp_rank]
        microbatches = self._microbatches(self.data.eval, mine, vectors_ND)
        with torch.no_grad():
            result = forward_backward(
                self.trained.model,
                self.stage.forward_step(),
                microbatches,
                seq_length=max(mine.lengths, default=0),
                forward_only=True,
                loss_key=self.stage.loss_key,
            )
        return result.loss

    def _microbatches(self, data, plan, vectors_ND=None) -> list[dict]:
        return [
            {
                k: v.to(self.device)
                for k, v in self.stage.microbatch(
                    data, samples, length, self.data.pad_id, vectors_ND
                ).items()
            }
            for samples, length in zip(plan.samples, plan.lengths, strict=True)
        ]

    def train_state(self, step: int) -> dict:
        self.trained.sidecar.training = {**self.training_info, "step": step}
        return self.data.state(step)

    def check_resume(self, state: dict) -> None:
        self.data.check_resume(state)


# --- building a run ------------------------------------------------------------------------------


def run(cfg, role: str):
    """This rank's part of an SFT run (see the module docstring); returns the loop's result."""
    from transformers import AutoTokenizer

    from nla_mcore.config import to_yaml
    from nla_mcore.models.hf_config import load_hf_config
    from nla_mcore.runtime.distributed import init_distributed, set_seed
    from nla_mcore.runtime.parallel import initialize_model_parallel
    from nla_mcore.train.loop import LoopSettings, train
    from nla_mcore.train.sft_config import require_run_fields
    from nla_mcore.train.sources import resolve_source

    require_run_fields(cfg)
    env, device = init_distributed(cfg.device)
    source = resolve_source(cfg.model.source, role)
    tokenizer = AutoTokenizer.from_pretrained(source.hf_dir)
    hf = load_hf_config(source.hf_dir)
    if cfg.data.max_length is None:
        cfg.data.max_length = min(DEFAULT_MAX_LENGTH, hf.max_position_embeddings)
    dp = cfg.parallel.data_parallel(env.world_size)
    split = "ar_sft" if role == "ar" else "av_sft"
    data = _load_data(cfg, split, tokenizer, hf, source, dp)
    layer = _extraction_layer(cfg, data, source)
    _check_layer(layer, hf, source)
    depth = layer + 1 if role == "ar" else hf.num_layers
    _check_layout(cfg, env.world_size, hf, depth, dp)
    initialize_model_parallel(cfg.parallel)
    set_seed(cfg.train.seed)
    out_dir = Path(cfg.output_dir)
    if env.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))
    ckpt = Checkpointer(cfg.checkpoint, out_dir / "checkpoints")
    resume_from = ckpt.resume_dir()
    total = cfg.train.steps or data.steps_for(cfg.train.epochs)
    stage = _stage(cfg, role, data, hf, source, tokenizer)
    trained = _trained_model(
        cfg, role, stage, source, hf, layer, data, total, load_weights=resume_from is None
    )
    task = SFTTask(
        stage=stage,
        trained=trained,
        data=data,
        hf=hf,
        depth=depth,
        total_steps=total,
        device=device,
        dp_rank=_dp_rank(),
        training_info=_training_info(cfg, env.world_size, total),
    )
    _announce(env.rank, task, cfg, source, layer, dp)
    settings = LoopSettings(
        checkpoint=cfg.checkpoint,
        logging=cfg.logging,
        health=cfg.health,
        eval_every=cfg.train.eval_every,
        stop_after=cfg.train.stop_after,
    )
    result = train(task, ckpt, resume_from, out_dir, settings)
    if env.rank == 0:
        _finish(cfg, task, result, out_dir)
    return result


def _load_data(cfg, split, tokenizer, hf, source, dp) -> SFTData:
    from nla_mcore.train.sft_data import load_sft_data

    layer = cfg.model.extraction_layer
    if layer is None and source.sidecar is not None:
        layer = source.sidecar.extraction_layer_index
    return load_sft_data(
        cfg,
        split,
        tokenizer,
        d_model=hf.hidden_size,
        extraction_layer=layer,
        dp=dp,
        pad_multiple=_pad_multiple(cfg),
    )


def _extraction_layer(cfg, data: SFTData, source) -> int:
    """K: the data's layer; the config and an nla-mcore source must agree with it."""
    found = {"the data's extraction.layer_index": data.rows.sidecar.extraction.layer_index}
    if cfg.model.extraction_layer is not None:
        found["model.extraction_layer"] = cfg.model.extraction_layer
    if source.sidecar is not None and source.sidecar.extraction_layer_index is not None:
        found["the source's extraction_layer_index"] = source.sidecar.extraction_layer_index
    if len(set(found.values())) > 1:
        raise DataError(f"the extraction layer K disagrees: {found}")
    return next(iter(found.values()))


def _check_layer(layer: int, hf, source) -> None:
    if not 0 <= layer < hf.num_layers:
        raise DataError(
            f"the data was extracted at layer K={layer}, but {source.path} has "
            f"{hf.num_layers} layers: the data and the model must come from the same base model"
        )


def _pad_multiple(cfg) -> int:
    par = cfg.parallel
    multiple = cfg.data.pad_multiple
    if par.context_parallel > 1:
        multiple = math.lcm(multiple, 2 * par.context_parallel)
    if par.sequence_parallel:
        multiple = math.lcm(multiple, par.tensor_parallel)
    return multiple


def _check_layout(cfg, world_size, hf, depth, dp) -> None:
    from nla_mcore.runtime.parallel import LayoutError, validate_layout

    pp = cfg.parallel.pipeline_parallel
    if depth < pp:
        raise LayoutError(f"{depth} layers cannot fill parallel.pipeline_parallel={pp} stages")
    validate_layout(
        cfg.parallel,
        world_size=world_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        num_layers=pp,  # uneven splits are fine
        vocab_size=hf.vocab_size,
    )
    per_step = dp * cfg.train.micro_batch_size
    if cfg.train.global_batch_size % per_step:
        raise LayoutError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of "
            f"dp x train.micro_batch_size = {dp} x {cfg.train.micro_batch_size}"
        )
    if cfg.data.max_length is not None and cfg.data.max_length > hf.max_position_embeddings:
        raise LayoutError(
            f"data.max_length={cfg.data.max_length} exceeds the model's "
            f"max_position_embeddings={hf.max_position_embeddings}"
        )


def _stage(cfg, role, data, hf, source, tokenizer):
    if role == "ar":
        scale = cfg.model.mse_scale
        if scale is None and source.sidecar is not None:
            scale = source.sidecar.extraction.mse_scale
        return ARStage(mse_scale=scale)
    return AVStage(
        tokens=data.rows.sidecar.tokens,
        vocab_size=hf.vocab_size,
        injection_scale=_injection_scale(cfg, data, source),
    )


def _injection_scale(cfg, data: SFTData, source) -> float:
    """The configured scale; else the source AV's; else a round number above the mean norm."""
    configured = cfg.model.injection_scale
    inherited = source.sidecar.extraction.injection_scale if source.sidecar else None
    if configured is not None and inherited is not None and configured != inherited:
        raise DataError(
            f"model.injection_scale={configured} differs from the source AV's {inherited}: an AV "
            "reads vectors at the scale it was trained with; drop the setting to keep it"
        )
    if configured is not None or inherited is not None:
        return float(configured if configured is not None else inherited)
    return suggested_injection_scale(data.train.vectors_ND)


def suggested_injection_scale(vectors_ND: np.ndarray) -> float:
    """1.1 x the mean vector norm, rounded up to two significant digits (NLA.md: "a round number a
    bit above the mean norm of the dataset's vectors")."""
    target = 1.1 * float(np.linalg.norm(vectors_ND.astype(np.float64), axis=1).mean())
    step = 10.0 ** (math.floor(math.log10(target)) - 1)
    return math.ceil(target / step) * step


def _trained_model(cfg, role, stage, source, hf, layer, data, total, *, load_weights: bool):
    from nla_mcore.models.build import make_recipe
    from nla_mcore.models.nla import ar_recipe, build_ar, build_av
    from nla_mcore.train.engine import wrap_ddp
    from nla_mcore.train.optim import build_optimizer, build_scheduler

    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    base = make_recipe(hf, cfg.parallel, dtype=dtype, backend=cfg.model.backend)
    recipe = ar_recipe(base, layer) if role == "ar" else base
    weights = source.weights() if load_weights else {"empty": True}
    model = (build_ar if role == "ar" else build_av)(recipe, **weights)
    if cfg.parallel.pipeline_parallel > 1:
        model.config.variable_seq_lengths = True  # micro-batches have their own lengths
    ddp = wrap_ddp(
        model,
        distributed_optimizer=cfg.optim.distributed,
        overlap_grad_reduce=cfg.optim.overlap_grad_reduce,
    )
    optimizer = build_optimizer(ddp, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    return TrainedModel(
        name=role,
        model=ddp,
        optimizer=optimizer,
        scheduler=scheduler,
        recipe=recipe,
        sidecar=_model_sidecar(cfg, role, stage, source, hf, layer, data),
        hf_dir=source.hf_dir,
        distributed_optimizer=cfg.optim.distributed,
    )


def _model_sidecar(cfg, role, stage, source, hf, layer, data):
    from nla_mcore.prompts import default_mse_scale
    from nla_mcore.sidecar import Extraction, ModelSidecar, Provenance

    data_sidecar = data.rows.sidecar
    mse_scale = stage.mse_scale if role == "ar" else None
    return ModelSidecar(
        role=role,
        d_model=hf.hidden_size,
        stage="sl",
        base_checkpoint=source.base_checkpoint,
        extraction=Extraction(
            injection_scale=stage.injection_scale if role == "av" else None,
            mse_scale=mse_scale if mse_scale is not None else default_mse_scale(hf.hidden_size),
        ),
        tokens=data_sidecar.tokens,
        prompt_templates=data_sidecar.prompt_templates,
        extraction_layer_index=layer,
        trained_on=[str(Path(cfg.data.train_file).resolve())],
        parent_checkpoints=[str(source.path)],
        provenance=Provenance.current(),
    )


def _training_info(cfg, world_size: int, total: int) -> dict:
    optim = cfg.optim
    return {
        "steps": total,
        "lr": optim.lr,
        "min_lr": optim.min_lr,
        "warmup_steps": optim.warmup_steps,
        "decay": optim.decay,
        "weight_decay": optim.weight_decay,
        "clip_grad": optim.clip_grad,
        "global_batch_size": cfg.train.global_batch_size,
        "micro_batch_size": cfg.train.micro_batch_size,
        "seed": cfg.train.seed,
        "world_size": world_size,
        "tensor_parallel": cfg.parallel.tensor_parallel,
        "pipeline_parallel": cfg.parallel.pipeline_parallel,
        "context_parallel": cfg.parallel.context_parallel,
    }


def _dp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank()


def _announce(rank, task: SFTTask, cfg, source, layer, dp) -> None:
    if rank != 0:
        return
    data, stage = task.data, task.stage
    held = len(data.eval) if data.eval is not None else 0
    extra = (
        f"injection_scale {stage.injection_scale:g}"
        if stage.role == "av"
        else f"mse_scale {stage.mse_scale or 'sqrt(d)'}"
    )
    skipped = dict(data.rows.skipped + data.train.skipped)
    print(
        f"[{task.label}] {source.kind} source {source.path} (K={layer}, {task.depth} layers, "
        f"d={task.hf.hidden_size}, {str(task.trained.recipe.dtype).removeprefix('torch.')}, "
        f"{task.trained.recipe.backend} "
        f"layers); {extra}\n"
        f"[{task.label}] data {data.rows.path}: {len(data.train)} training samples, {held} held "
        f"out{f', skipped {skipped}' if skipped else ''}; mean length "
        f"{data.train.lengths_N.mean():.0f} tokens (max {data.train.lengths_N.max()})\n"
        f"[{task.label}] {task.total_steps} steps of {cfg.train.global_batch_size} samples "
        f"(micro-batch {cfg.train.micro_batch_size}, dp {dp}, tp {cfg.parallel.tensor_parallel}, "
        f"pp {cfg.parallel.pipeline_parallel}, cp {cfg.parallel.context_parallel}); "
        f"length-bucketed batches, padding {padding_fraction(data.plan(1)):.1%} at step 1",
        flush=True,
    )


def _finish(cfg, task: SFTTask, result, out_dir: Path) -> None:
    """Rank 0, after the final checkpoint: HF export, curves, one summary line."""
    from nla_mcore.converters.nla_export import export_nla
    from nla_mcore.train.loop import metrics_path
    from nla_mcore.train.plots import plot_run

    exported = None
    if cfg.export.enabled and result.complete:
        exported = Path(cfg.export.dir or out_dir / "hf")
        export_nla(result.checkpoint / task.stage.role, exported)
    png = None
    if cfg.logging.plot:
        png = plot_run(
            metrics_path(out_dir),
            out_dir / "curves.png",
            title=f"{task.label}: {Path(cfg.data.train_file).name}",
        )
    last = result.last_train.get("loss")
    evals = "  ".join(f"{k} {v:.4f}" for k, v in result.last_eval.items())
    print(
        f"[{task.label}] done: step {result.final_step}/{task.total_steps}"
        + (f", loss {last:.4f}" if last is not None else "")
        + (f", eval {evals}" if evals else "")
        + f"\n[{task.label}] checkpoint {result.checkpoint}"
        + (f"\n[{task.label}] Hugging Face export {exported}" if exported else "")
        + (f"\n[{task.label}] curves {png}" if png else ""),
        flush=True,
    )


# --- entry points --------------------------------------------------------------------------------


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says it all: printed once, without a traceback."""
    from nla_mcore.config import ConfigError
    from nla_mcore.converters.hf_io import CheckpointError
    from nla_mcore.models.injection import InjectionError
    from nla_mcore.prompts import PromptError
    from nla_mcore.runtime.parallel import LayoutError
    from nla_mcore.sidecar import SidecarError
    from nla_mcore.train.optim import NonFiniteStepError

    return (
        ConfigError,
        CheckpointError,
        DataError,
        LayoutError,
        SidecarError,
        PromptError,
        InjectionError,
        NonFiniteStepError,
    )


def main(argv: list[str] | None = None) -> int:
    """Rank entry point: `python -m nla_mcore.train.sft {ar|av} [--config F] [key=value ...]`."""
    from nla_mcore.config import ConfigError, load_config
    from nla_mcore.runtime.distributed import read_dist_env
    from nla_mcore.runtime.noise import silence_known_warnings
    from nla_mcore.train.sft_config import ARSFTConfig, AVSFTConfig

    silence_known_warnings()
    args = list(sys.argv[1:] if argv is None else argv)
    role, args = args[0], args[1:]
    config_path = None
    if args[:1] == ["--config"]:
        config_path, args = args[1], args[2:]
    rank = read_dist_env().rank
    logging.basicConfig(
        level=logging.WARNING, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"
    )
    try:
        try:
            cfg = load_config(ARSFTConfig if role == "ar" else AVSFTConfig, config_path, args)
        except ValueError as err:  # the schema's own checks
            raise ConfigError(str(err)) from err
        run(cfg, role)
    except _user_errors() as err:
        if rank == 0:
            print(f"nla-mcore {ROLES[role]}: error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
