"""Where a process sits in the job, read from torchrun's or Slurm's environment."""

from __future__ import annotations

import pytest

from nla_mcore.runtime.distributed import read_dist_env


def test_torchrun_variables():
    env = read_dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                         "MASTER_ADDR": "node7", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        3, 8, 1, "node7", 1234, "torchrun")


def test_slurm_variables_with_master_addr():
    env = read_dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                         "MASTER_ADDR": "gpu-001", "MASTER_PORT": "29600"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (
        5, 16, 5, "gpu-001", "slurm")


def test_slurm_without_nodelist_or_master_is_a_clear_error():
    with pytest.raises(RuntimeError, match="SLURM_JOB_NODELIST or MASTER_ADDR"):
        read_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_torchrun_wins_over_slurm():
    """torchrun inside an sbatch allocation: torchrun's ranks are the ones to use."""
    env = read_dist_env({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.launcher) == (1, 2, "torchrun")


def test_no_launcher_is_a_world_of_one():
    env = read_dist_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single") and env.master_port > 0
