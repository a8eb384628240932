"""Training checkpoints: Megatron-Core dist-checkpoints of every trained model, saved without
stalling the step, visible only once complete, and resumed exactly.

Layout of `{output_dir}/checkpoints/`:

    step_0000500/
      train_state.json      step, consumed samples, each model's LR schedule, layout, data
                            fingerprint; written last: its presence means "complete"
      ar/ (or av/, ...)     an nla-mcore checkpoint (converters/checkpoint.py) of one model:
        nla_checkpoint.json, nla_meta.yaml, hf/ (config + tokenizer),
        model/              dist-checkpoint (torch_dist) of the weights *and* the optimizer
      rng/rank_00000.safetensors ...   each rank's torch / CUDA / Megatron tracker RNG states
    .step_0001000.tmp-xxxx/ a save in flight (or one killed mid-way): ignored, cleaned on resume

Because each model directory is an ordinary nla-mcore checkpoint, `nla-mcore convert
mcore-to-hf`, `build_av(ckpt_dir=)` and the exporters read any training checkpoint as it is.

* **Async.** `dist_checkpointing.save(..., async_sharded_save=True)` copies the shards to host
  memory (the only part the step waits for) and a forked process writes them; the commit (rank 0
  writes the small files, then renames the temp directory to `step_N`) runs as the request's
  finalize function once every rank's writer is done (`poll`, called each step, or `wait`).
  At most one save is in flight: a new save first waits for the previous one.
* **Atomic.** A crash or `kill -9` at any point leaves the previous `step_*` directories as they
  were; the partial save is a dot-directory that `resume` never looks at.
* **Formats.** Weights are fully reshardable (any TP/PP/DP on load).  The distributed
  optimizer's state is saved `dp_reshardable` by default (written in parallel by every rank;
  reloads at another DP size), or `fully_reshardable` (gathered per DP group: reloads at any
  TP/PP too, slower to save).
* **Exact resume.** Weights, fp32 main params, Adam moments and step, the schedule's position
  and the RNG states are restored; data order is a function of the step (`data/batching.py`).
  A changed LR schedule or global batch is refused (Miles silently flattened the schedule).

Fault injection for tests: `NLA_MCORE_CKPT_WRITE_DELAY_S` delays the background writer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from nla_mcore.converters.checkpoint import (
    check_shapes,
    model_sharded_state_dict,
    write_checkpoint_files,
)
from nla_mcore.converters.hf_io import CheckpointError, share_permissions
from nla_mcore.train import mcore_compat

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
STATE_FORMAT = 1
STEP_DIR = re.compile(r"^step_(\d{7,})$")
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")
WRITE_DELAY_ENV = "NLA_MCORE_CKPT_WRITE_DELAY_S"


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """When and how training state is saved and resumed."""

    every: int = 500
    """Save every this many steps (0: only at the end); the last step is always saved."""
    keep_last: int = 2
    """Complete checkpoints to keep (older ones are deleted once a newer one is complete);
    0 keeps all."""
    async_save: bool = True
    """Write checkpoints in a background process; the step waits only for the host copy."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in output_dir, if any; none: start
    fresh (refused if output_dir has checkpoints); or the path of a step_* directory."""
    load_optimizer: bool = True
    """On resume, restore the optimizer state (false: weights, schedule and data position only)."""
    optimizer_format: str = "dp_reshardable"
    """Distributed-optimizer state: dp_reshardable (parallel save; reload at another DP size) or
    fully_reshardable (reload at any TP/PP/DP; gathered on save)."""
    allow_schedule_change: bool = False
    """Resume even if the LR schedule differs from the checkpoint's (it then follows the new
    config from the resumed step on)."""

    def __post_init__(self):
        if self.every < 0 or self.keep_last < 0:
            raise ValueError("checkpoint.every and checkpoint.keep_last must be >= 0")
        if self.optimizer_format not in OPTIMIZER_FORMATS:
            raise ValueError(
                f"checkpoint.optimizer_format={self.optimizer_format!r}: one of "
                f"{list(OPTIMIZER_FORMATS)}"
            )
        if not self.resume:
            raise ValueError("checkpoint.resume is empty: auto, none, or a step_* directory")


@dataclass
class TrainedModel:
    """One model a run trains: what the loop steps, checkpoints and exports."""

    name: str
    """Checkpoint subdirectory and metric prefix ('ar', 'av')."""
    model: Any
    """This rank's stage, wrapped in Megatron-Core DDP."""
    optimizer: Any
    scheduler: Any
    recipe: Any
    """`models.build.ModelRecipe` it was built from."""
    sidecar: Any
    """`sidecar.ModelSidecar` written beside every checkpoint (its `training` is updated)."""
    hf_dir: Path
    """Where the tokenizer files are copied from."""
    distributed_optimizer: bool = True
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SaveReport:
    stall_s: float
    """Seconds `save` held the caller (including `previous_s`)."""
    previous_s: float
    """Of which waiting for the previous save to finish writing."""
    committed: int | None
    """The step of the previous save, if this call committed it."""


class Checkpointer:
    """Saves and resumes the `TrainedModel`s of a run (every rank calls every method)."""

    def __init__(self, cfg: CheckpointConfig, root: str | Path):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.cfg = cfg
        self.root = Path(root).resolve()
        self.queue = AsyncCallsQueue(persistent=False)
        self.strategies: dict[str, Any] = {}
        self.pending_step: int | None = None
        self.pending_call: int | None = None
        """The queue index of the in-flight save's last request (the one that commits)."""
        self.saves = 0
        self.last_stall_s = 0.0
        if cfg.async_save:
            # The async writer reports through a queue served by a multiprocessing Manager,
            # a spawned interpreter that takes seconds to start; start it now, not in step N.
            from megatron.core.dist_checkpointing.strategies import filesystem_async

            filesystem_async._get_write_results_queue()

    # --- finding checkpoints -------------------------------------------------------------------

    def complete_steps(self) -> list[tuple[int, Path]]:
        """(step, directory) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = STEP_DIR.match(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match[1]), path))
        return sorted(found)

    def resume_dir(self) -> Path | None:
        """The checkpoint to resume from under `cfg.resume`, or None to start fresh."""
        if self.cfg.resume == "none":
            if self.complete_steps():
                raise CheckpointError(
                    f"{self.root} already holds checkpoints and checkpoint.resume=none: set "
                    "checkpoint.resume=auto to continue that run, or choose a new output_dir"
                )
            return None
        if self.cfg.resume == "auto":
            steps = self.complete_steps()
            return steps[-1][1] if steps else None
        path = Path(self.cfg.resume).resolve()
        if not (path / STATE_FILE).is_file():
            raise CheckpointError(
                f"checkpoint.resume={self.cfg.resume}: not a complete training checkpoint "
                f"(no {STATE_FILE})"
            )
        return path

    # --- saving --------------------------------------------------------------------------------

    def save(self, step: int, models: list[TrainedModel], train_state: dict, *, final=False):
        """Save the state after `step` optimizer steps (async unless disabled or `final`).

        Returns a `SaveReport`: how long the caller waited (for the previous save still in
        flight, if any, and for the host copy of this one) and which save that wait committed."""
        from megatron.core import dist_checkpointing

        started = time.perf_counter()
        committed = self.wait()
        waited_for_previous = time.perf_counter() - started
        asynchronous = self.cfg.async_save and not final
        temp = self._shared_temp_dir(step, [m.name for m in models])
        requests = []
        for m in models:
            state = self._sharded_state(m, is_loading=False)
            request = dist_checkpointing.save(
                state,
                str(temp / m.name / "model"),
                self._strategy(m.name),
                validate_access_integrity=self.saves == 0,
                async_sharded_save=asynchronous,
            )
            requests.append(request)
        save_rng_state(temp / "rng")
        commit = partial(self._commit, temp, step, self._files_to_write(models, step, train_state))
        if asynchronous:
            requests[-1].add_finalize_fn(commit)  # the queue finalizes in order: runs last
            for request in requests:
                self.pending_call = self.queue.schedule_async_request(_with_write_delay(request))
            self.pending_step = step
        else:
            commit()
        self.saves += 1
        self.last_stall_s = time.perf_counter() - started
        return SaveReport(
            stall_s=self.last_stall_s, previous_s=waited_for_previous, committed=committed
        )

    def poll(self) -> int | None:
        """Commit a finished background save (every rank, once per step); its step or None."""
        if self.pending_step is None:
            return None
        if self.pending_call not in self.queue.maybe_finalize_async_calls(blocking=False):
            return None  # (with several models, the earlier ones may be done already)
        return self._committed()

    def wait(self) -> int | None:
        """Block until the save in flight (if any) is committed; its step or None."""
        if self.pending_step is None:
            return None
        self.queue.maybe_finalize_async_calls(blocking=True)
        return self._committed()

    def close(self) -> None:
        self.wait()
        self.queue.close()

    def _committed(self) -> int:
        step, self.pending_step = self.pending_step, None
        return step

    def _sharded_state(self, m: TrainedModel, *, is_loading: bool, with_optimizer=True) -> dict:
        module = m.model.module
        model_state = model_sharded_state_dict(module)
        state = {"model": model_state}
        if with_optimizer:
            if is_loading:
                mcore_compat.prepare_for_load(m.optimizer)
            state["optimizer"] = m.optimizer.sharded_state_dict(
                model_state,
                is_loading=is_loading,
                metadata={"distrib_optim_sharding_type": self.cfg.optimizer_format},
            )
        return state

    def _strategy(self, name: str):
        """A save strategy per model, reused across saves: every data-parallel rank writes a
        share of the replicated tensors (Megatron-Core's fully parallel save)."""
        if name not in self.strategies:
            from megatron.core import parallel_state as ps
            from megatron.core.dist_checkpointing.strategies.fully_parallel import (
                FullyParallelSaveStrategyWrapper,
            )
            from megatron.core.dist_checkpointing.strategies.torch import (
                TorchDistSaveShardedStrategy,
            )

            self.strategies[name] = FullyParallelSaveStrategyWrapper(
                TorchDistSaveShardedStrategy("torch_dist", 1),
                ps.get_data_parallel_group(with_context_parallel=True),
                do_cache_distribution=True,
            )
        return self.strategies[name]

    def _files_to_write(self, models: list[TrainedModel], step: int, train_state: dict) -> dict:
        """What the commit writes besides the shards, captured now (the models move on)."""
        from nla_mcore.converters.nla_export import nla_checkpoint_meta, sidecar_files

        state = {
            "format": STATE_FORMAT,
            "step": step,
            **train_state,
            "world_size": torch.distributed.get_world_size(),
            "optimizer_format": self.cfg.optimizer_format,
            "models": {
                m.name: {
                    "scheduler": m.scheduler.state_dict(),
                    "distributed_optimizer": m.distributed_optimizer,
                }
                for m in models
            },
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        per_model = {
            m.name: (
                nla_checkpoint_meta(m.recipe, m.sidecar.role),
                m.hf_dir,
                sidecar_files(m.sidecar),
            )
            for m in models
        }
        return {"state": state, "models": per_model}

    def _commit(self, temp: Path, step: int, files: dict) -> None:
        """Finalize on every rank: rank 0 writes the small files, renames, prunes."""
        if torch.distributed.get_rank() == 0:
            for name, (meta, hf_dir, extra) in files["models"].items():
                write_checkpoint_files(temp / name, meta, hf_dir=hf_dir, extra_files=extra)
            _write_json(temp / STATE_FILE, files["state"])
            final = self.root / f"step_{step:07d}"
            if final.exists():
                shutil.rmtree(final)
            share_permissions(temp)
            os.replace(temp, final)
            _fsync_dir(self.root)
            self._prune(keep=final)
        torch.distributed.barrier()

    def _prune(self, keep: Path) -> None:
        if self.cfg.keep_last == 0:
            return
        steps = [path for _, path in self.complete_steps()]
        for path in steps[: max(len(steps) - self.cfg.keep_last, 0)]:
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)

    def _shared_temp_dir(self, step: int, names: list[str]) -> Path:
        """A fresh temp directory (with each model's `model/`), made by rank 0, for all ranks."""
        name = [None]
        if torch.distributed.get_rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            temp = Path(tempfile.mkdtemp(prefix=f".step_{step:07d}.tmp-", dir=self.root))
            for model_name in names:
                (temp / model_name / "model").mkdir(parents=True)
            (temp / "rng").mkdir()
            name[0] = str(temp)
        torch.distributed.broadcast_object_list(name, src=0)
        return Path(name[0])

    def remove_stale_temps(self) -> None:
        """Delete partial saves of earlier (killed) runs; rank 0, before this run saves."""
        if torch.distributed.get_rank() == 0 and self.root.is_dir():
            for stale in self.root.glob(".step_*.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        torch.distributed.barrier()

    # --- loading -------------------------------------------------------------------------------

    def load(self, step_dir: Path, models: list[TrainedModel]) -> dict:
        """Restore every model (and this rank's RNG) from `step_dir`; returns its train state."""
        state = read_train_state(step_dir)
        for m in models:
            self._load_model(step_dir, m, state)
        if state.get("world_size") == torch.distributed.get_world_size():
            load_rng_state(step_dir / "rng")
        else:
            log.warning(
                "resuming with %d ranks from a checkpoint of %d: RNG states start from the seed "
                "(data order and weights are unaffected)",
                torch.distributed.get_world_size(),
                state.get("world_size"),
            )
        return state

    def _load_model(self, step_dir: Path, m: TrainedModel, state: dict) -> None:
        from megatron.core import dist_checkpointing

        saved = state["models"].get(m.name)
        if saved is None:
            raise CheckpointError(
                f"{step_dir}: no model '{m.name}' (it holds {list(state['models'])})"
            )
        with_optimizer = self.cfg.load_optimizer
        if with_optimizer and saved["distributed_optimizer"] != m.distributed_optimizer:
            raise CheckpointError(
                f"{step_dir}: saved with optim.distributed={saved['distributed_optimizer']}, this "
                f"run has {m.distributed_optimizer}: change it back, or resume the weights only "
                "with checkpoint.load_optimizer=false"
            )
        if with_optimizer and state.get("optimizer_format") != self.cfg.optimizer_format:
            raise CheckpointError(
                f"{step_dir}: optimizer saved as {state.get('optimizer_format')}, this run asks "
                f"for checkpoint.optimizer_format={self.cfg.optimizer_format}"
            )
        model_dir = step_dir / m.name / "model"
        template = self._sharded_state(m, is_loading=True, with_optimizer=with_optimizer)
        check_shapes(template["model"], model_dir)
        loaded = dist_checkpointing.load(template, str(model_dir))
        missing = m.model.module.load_state_dict(loaded["model"], strict=False).missing_keys
        missing = [k for k in missing if not k.endswith("._extra_state")]
        if missing:
            raise CheckpointError(f"{model_dir}: no weights for {missing[:10]}")
        with torch.no_grad():
            if with_optimizer:
                m.optimizer.load_state_dict(loaded["optimizer"])
                mcore_compat.restore_adam_steps(m.optimizer)
            else:
                m.optimizer.reload_model_params()
        restore_schedule(
            m, saved["scheduler"], step_dir, allow_change=self.cfg.allow_schedule_change
        )


def restore_schedule(m: TrainedModel, saved: dict, where: Path, *, allow_change: bool) -> None:
    """Put the schedule at the saved step, refusing a silent change of its shape."""
    current = m.scheduler.state_dict()
    changed = {
        k: (saved.get(k), v) for k, v in current.items() if k != "num_steps" and saved.get(k) != v
    }
    if changed and not allow_change:
        lines = ", ".join(f"{k}: checkpoint {a} -> config {b}" for k, (a, b) in changed.items())
        raise CheckpointError(
            f"{where}: the learning-rate schedule of '{m.name}' differs from the checkpoint's "
            f"({lines}); restore the settings, or set checkpoint.allow_schedule_change=true"
        )
    if changed:
        log.warning("%s: the schedule of '%s' changes on resume: %s", where, m.name, changed)
    m.scheduler.step(increment=int(saved["num_steps"]) - m.scheduler.num_steps)


def read_train_state(step_dir: Path) -> dict:
    path = Path(step_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read the training state ({err})") from err
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: format {state.get('format')} is not {STATE_FORMAT}")
    return state


# --- RNG -----------------------------------------------------------------------------------------


def rng_tensors() -> dict[str, torch.Tensor]:
    """This rank's generator states as uint8 tensors (CPU; safetensors-friendly)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state().cpu()
    for name, tracker_state in get_cuda_rng_tracker().get_states().items():
        states[f"tracker.{name}"] = tracker_state.cpu()
    return {k: v.contiguous() for k, v in states.items()}


def save_rng_state(directory: Path) -> None:
    from safetensors.torch import save_file

    rank = torch.distributed.get_rank()
    save_file(rng_tensors(), str(directory / f"rank_{rank:05d}.safetensors"))


def load_rng_state(directory: Path) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from safetensors.torch import load_file

    rank = torch.distributed.get_rank()
    states = load_file(str(directory / f"rank_{rank:05d}.safetensors"))
    torch.set_rng_state(states["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in states:
        torch.cuda.set_rng_state(states["torch_cuda"])
    tracker = {k.removeprefix("tracker."): v for k, v in states.items() if k.startswith("tracker.")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)


# --- small helpers -------------------------------------------------------------------------------


def _with_write_delay(request):
    """The request with its background writer delayed by $NLA_MCORE_CKPT_WRITE_DELAY_S (tests)."""
    delay = float(os.environ.get(WRITE_DELAY_ENV, "0") or 0)
    if delay <= 0 or request.async_fn is None:
        return request
    return request._replace(async_fn=partial(_delayed_call, request.async_fn, delay))


def _delayed_call(fn, delay: float, *args, **kwargs):
    time.sleep(delay)
    return fn(*args, **kwargs)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
