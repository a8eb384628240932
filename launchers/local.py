"""Launch a rank program on this machine: in-process for one rank, torchrun for several.

`launch(module, nproc, args)` runs `python -m module args` directly when `nproc == 1` or when
already inside a launcher (RANK is set: torchrun, srun, or a NeMo-Run executor started us);
otherwise it runs torchrun's standalone rendezvous, one process per rank, and returns its exit
code.  Output of all ranks goes to this terminal; rank programs print only on rank 0.
"""

from __future__ import annotations

import os
import subprocess
import sys


def under_launcher(environ=os.environ) -> bool:
    """True when this process is already one rank of a launched job."""
    return "RANK" in environ or "SLURM_PROCID" in environ


def torchrun_command(module: str, nproc: int, args: list[str]) -> list[str]:
    """The torchrun command line for `nproc` local ranks of `python -m module args`."""
    return [
        sys.executable,
        "-m",
        "nla_mcore.launchers.torchrun",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        module,
        *args,
    ]


def launch(module: str, nproc: int, args: list[str]) -> int:
    """Run `module` with `nproc` local ranks; returns the exit code."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if nproc == 1 or under_launcher():
        return subprocess.call([sys.executable, "-m", module, *args])
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default too; explicit silences its warning
    return subprocess.call(torchrun_command(module, nproc, args), env=env)
