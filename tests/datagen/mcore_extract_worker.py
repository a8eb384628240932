"""Rank programs for the Megatron-Core extraction tests (spawned by `tests.multirank.run_ranks`).

`layout_jobs`: the provider's vectors for fixed batches at several layouts in one launch (each
job re-creates the model-parallel groups). `datagen_jobs`: whole `nla-mcore datagen` runs
through `extract_main.main`, optionally after forgetting a run's last shard (a resume).
`both`: the two in one launch (a rank start costs seconds of imports).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

LAYER = 2  # K: blocks 0..2 of the toy models' 4


def layout_jobs(jobs: list[tuple]) -> dict[str, dict]:
    """{name: {is_writer, holds, vectors}} for jobs (name, hf_dir, parallel, ids, positions)."""
    from nla_mcore.datagen.mcore_provider import MCoreActivationProvider, writer_rank_info
    from nla_mcore.runtime.distributed import init_distributed, set_seed
    from nla_mcore.runtime.parallel import ParallelConfig, initialize_model_parallel

    torch.set_num_threads(1)
    init_distributed("cpu")
    results = {}
    for name, hf_dir, parallel, batch_ids, batch_positions in jobs:
        par = ParallelConfig(**parallel)
        initialize_model_parallel(par)
        set_seed(0)
        provider = MCoreActivationProvider.from_hf(
            hf_dir, layer=LAYER, parallel=par, dtype="float32"
        )
        vectors = provider.activations(batch_ids, batch_positions)
        results[name] = {
            "is_writer": writer_rank_info()[2],
            "holds": provider.holds_vectors,
            "vectors": [np.asarray(v) for v in vectors],
        }
    return results


def datagen_jobs(jobs: list[tuple[list[str], str | None]]) -> list[bytes | None]:
    """Run `extract_main.main(argv)` per job; a job's second item names an activations directory
    whose last shard is forgotten first (rank 0, between barriers), as a kill would. Returns the
    forgotten shard's bytes (or None) per job."""
    from nla_mcore.datagen.extract_main import main

    torch.set_num_threads(1)
    forgotten = []
    for argv, forget_in in jobs:
        shard = None
        if forget_in is not None:
            shard = (
                forget_last_shard(Path(forget_in)) if torch.distributed.get_rank() == 0 else None
            )
            torch.distributed.barrier()
        assert main(argv) == 0
        forgotten.append(shard)
    return forgotten


def forget_last_shard(activations: Path) -> bytes:
    """Delete the last shard of DP rank 0 and drop it from the manifest (marked incomplete)."""
    manifest_path = activations / "extract-manifest-dp000.json"
    manifest = json.loads(manifest_path.read_text())
    last = manifest["shards"].pop()
    manifest["complete"] = False
    manifest_path.write_text(json.dumps(manifest))
    shard = activations / last["file"]
    data = shard.read_bytes()
    shard.unlink()
    return data


def both(layouts: list[tuple], datagens: list[tuple[list[str], str | None]]) -> tuple:
    """`layout_jobs(layouts)`, then `datagen_jobs(datagens)`, in one launch."""
    return layout_jobs(layouts), datagen_jobs(datagens)
