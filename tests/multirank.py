"""Run a function on N spawned ranks (gloo on the CPU, NCCL on GPUs) and collect the results.

Each rank gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and calls
`fn(*args)`; return values come back in rank order.  A failure on any rank kills the others at
once (a rank stuck in a collective would otherwise wait for its timeout) and is re-raised here
with the failing rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback

from nla_mcore.runtime.distributed import free_port


def _rank_main(fn, args, rank, world_size, port, results):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        results.put((rank, "ok", fn(*args)))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0, env: dict | None = None):
    """`fn(*args)` on `world_size` fresh processes; returns their results in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    env = {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    procs = [
        ctx.Process(target=_rank_main, args=(fn, args, r, world_size, port, results))
        for r in range(world_size)
    ]
    saved = dict(os.environ)
    os.environ.update(env)  # children inherit it at start, before they import torch
    try:
        for p in procs:
            p.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    collected, deadline = {}, time.monotonic() + timeout
    try:
        while len(collected) < world_size:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and not any(r in collected for r in dead):
                    raise RuntimeError(f"rank(s) {dead} died without a result") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks timed out after {timeout:.0f}s") from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            collected[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10 if len(collected) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return [collected[r] for r in range(world_size)]
