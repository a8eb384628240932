"""Process-group start-up: rank/world from torchrun or Slurm, NCCL on GPUs, gloo on the CPU.

`init_distributed()` is the one call a program makes before building models.  It reads the
launcher's environment (torchrun's `RANK`/`WORLD_SIZE`/`LOCAL_RANK`, or Slurm's
`SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID` for `srun` without torchrun), picks the device,
enables the CPU functional mode when that device is the CPU, and initialises
`torch.distributed`.  A single process with no launcher is a world of one.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
from dataclasses import dataclass

import numpy as np
import torch

from nla_mcore.runtime import cpu_mode


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | single


def read_dist_env(environ=os.environ) -> DistEnv:
    """Rank, world size and rendezvous address from torchrun's or Slurm's variables."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return DistEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_NTASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            master_addr=environ.get("MASTER_ADDR") or _slurm_first_host(environ),
            master_port=int(environ.get("MASTER_PORT", 29500)),
            launcher="slurm",
        )
    return DistEnv(
        0, 1, 0, "127.0.0.1", int(environ.get("MASTER_PORT", 0)) or free_port(), "single"
    )


def _slurm_first_host(environ) -> str:
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise RuntimeError("Slurm launch without SLURM_JOB_NODELIST or MASTER_ADDR set")
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(
            f"could not expand SLURM_JOB_NODELIST={nodelist!r} with scontrol ({err}); "
            "export MASTER_ADDR in the sbatch script"
        ) from err
    return out.stdout.split()[0]


def free_port() -> int:
    """An unused TCP port on localhost (for single-process and test rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def select_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> this rank's GPU if CUDA is available, else the CPU (with the CPU mode on)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("runtime.device=cuda but no CUDA device is visible")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if device != "cpu":
        raise ValueError(f"runtime.device must be auto, cuda or cpu, got '{device}'")
    cpu_mode.enable()
    return torch.device("cpu")


def init_distributed(
    device: str = "auto", timeout_minutes: int = 30
) -> tuple[DistEnv, torch.device]:
    """Initialise torch.distributed for this process (idempotent); return its env and device."""
    env = read_dist_env()
    # Megatron-Core's TP communication overlap needs ordered kernel queues; must precede CUDA init.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    dev = select_device(device, env.local_rank)
    if not torch.distributed.is_initialized():
        from datetime import timedelta

        torch.distributed.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=timeout_minutes),
            device_id=dev if dev.type == "cuda" else None,
        )
    return env, dev


def set_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron-Core's model-parallel RNG tracker.

    Requires model-parallel groups (`runtime.parallel.initialize_model_parallel`): TP ranks get
    distinct tracker seeds for their weight shards, as Megatron-Core arranges.
    """
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def raise_on_any_rank(error: str | None, what: str) -> None:
    """Agree across all ranks on whether any failed; if one did, raise on every rank.

    Call it where ranks might fail independently (bad input on one pipeline stage): instead of
    one rank raising while the others wait in the next collective until a timeout, every rank
    raises at once with the failing ranks' messages.
    """
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        if error:
            raise RuntimeError(f"{what} failed: {error}")
        return
    errors: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    failed = [(rank, e) for rank, e in enumerate(errors) if e]
    if failed:
        lines = "\n".join(f"  rank {rank}: {e}" for rank, e in failed)
        raise RuntimeError(f"{what} failed on {len(failed)} rank(s):\n{lines}")
