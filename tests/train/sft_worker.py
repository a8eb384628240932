"""Rank programs for the SFT tests: a whole `sft-ar` / `sft-av` run inside a spawned rank.

`sft_runs(jobs)` runs `nla_mcore.train.sft.run` once per (role, overrides) job, one after the
other in the same ranks (layouts change between jobs), and returns rank 0's metrics of each:
{"train": [records], "eval": [records]} read back from `metrics.jsonl`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def base_overrides(model_dir: Path, data: dict[str, Path], out_dir: Path, role: str) -> list[str]:
    """Quick, quiet settings shared by the tests (fp32 on CPU; no export, no plot)."""
    return [
        f"model.source={model_dir}",
        f"data.train_file={data['ar_sft' if role == 'ar' else 'av_sft']}",
        f"output_dir={out_dir}",
        "device=cpu",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.eval_every=0",
        "data.eval_fraction=0",
        "optim.lr=1e-3",
        "optim.warmup_steps=2",
        "checkpoint.every=0",
        "export.enabled=false",
        "logging.plot=false",
        "logging.progress=false",
    ]


def sft_run(role: str, overrides: list[str]):
    from nla_mcore.config import load_config
    from nla_mcore.runtime.noise import silence_known_warnings
    from nla_mcore.train.metrics import METRICS_FILE, read_metrics
    from nla_mcore.train.sft import run
    from nla_mcore.train.sft_config import ARSFTConfig, AVSFTConfig

    silence_known_warnings()
    cfg = load_config(ARSFTConfig if role == "ar" else AVSFTConfig, None, overrides)
    run(cfg, role)
    if torch.distributed.get_rank() != 0:
        return None
    return read_metrics(Path(cfg.output_dir) / METRICS_FILE)


def sft_runs(jobs: list[tuple[str, list[str]]]) -> list:
    return [sft_run(role, overrides) for role, overrides in jobs]


def nan_at_step_run(role: str, overrides: list[str], bad_step: int) -> dict:
    """A run whose training set gets a NaN vector in one sample of update `bad_step` (after the
    file checks, as if it arose inside a step); returns the error, the samples named, and
    whether the weights moved in the failing step."""
    from nla_mcore.config import load_config
    from nla_mcore.data.batching import global_batch
    from nla_mcore.runtime.noise import silence_known_warnings
    from nla_mcore.train import sft, sft_data
    from nla_mcore.train.optim import NonFiniteStepError
    from nla_mcore.train.sft_config import ARSFTConfig, AVSFTConfig

    silence_known_warnings()
    cfg = load_config(ARSFTConfig if role == "ar" else AVSFTConfig, None, overrides)
    poisoned = {}
    load = sft_data.load_sft_data

    def load_poisoned(*args, **kwargs):
        data = load(*args, **kwargs)
        sample = int(
            global_batch(
                len(data.train),
                seed=data.seed,
                step=bad_step - 1,
                global_batch_size=data.global_batch_size,
            )[0]
        )
        data.train.vectors_ND = data.train.vectors_ND.copy()
        data.train.vectors_ND[sample] = np.nan
        poisoned["sample"] = data.train.describe(sample)
        return data

    snapshots = {}
    train_step = sft.SFTTask.train_step

    def recording_step(task, step):
        snapshots[step] = {n: p.detach().clone() for n, p in task.trained.model.named_parameters()}
        snapshots["task"] = task
        return train_step(task, step)

    sft_data.load_sft_data = load_poisoned
    sft.SFTTask.train_step = recording_step
    try:
        sft.run(cfg, role)
        error = None
    except NonFiniteStepError as err:
        error = str(err)
    finally:
        sft_data.load_sft_data = load
        sft.SFTTask.train_step = train_step
    task = snapshots.pop("task")
    before = snapshots[bad_step]
    moved = any(
        not torch.equal(before[n], p.detach()) for n, p in task.trained.model.named_parameters()
    )
    return {"error": error, "sample": poisoned["sample"], "weights_moved": moved}


def head_loss_rank(model_dir: str, ar_file: str) -> dict:
    """The AR's step-0 loss with the identity head and with a random head, on targets that are
    what real ones are: the same base model's layer-K states, here at the read-out token of
    other samples' prompts (the toy world's synthetic vectors have no relation to the model)."""
    import math

    from transformers import AutoTokenizer

    from nla_mcore.data.sft_batches import ar_microbatch
    from nla_mcore.data.sft_files import read_sft_file
    from nla_mcore.data.sft_tokenize import tokenize_ar
    from nla_mcore.kernels import normalized_mse
    from nla_mcore.models.build import make_recipe
    from nla_mcore.models.hf_config import load_hf_config
    from nla_mcore.models.nla import ar_recipe, build_ar
    from nla_mcore.runtime.distributed import init_distributed, set_seed
    from nla_mcore.runtime.parallel import ParallelConfig, initialize_model_parallel
    from nla_mcore.train.engine import forward_collect
    from nla_mcore.train.nla_steps import ar_forward_step

    init_distributed("cpu")
    initialize_model_parallel(ParallelConfig())
    set_seed(0)
    rows = read_sft_file(ar_file, "ar_sft")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = tokenize_ar(
        rows,
        tokenizer,
        suffix_ids=rows.sidecar.tokens.critic_suffix_ids,
        max_length=512,
        skip=False,
    )
    recipe = ar_recipe(
        make_recipe(load_hf_config(model_dir), ParallelConfig(), backend="local"),
        rows.sidecar.extraction.layer_index,
    )
    model = build_ar(recipe, hf_dir=model_dir)
    batch = ar_microbatch(data, np.arange(len(data)), int(data.lengths_N.max()), pad_id=0)
    batch.pop("target")  # without a target the step returns the predictions

    def predict():
        with torch.no_grad():
            ((pred, _owned),) = forward_collect(
                model, ar_forward_step, [batch], seq_length=batch["tokens"].shape[1]
            )
        return pred

    states = predict()  # identity head: the layer-K states themselves
    targets = torch.roll(states, 1, dims=0)
    identity = float(normalized_mse(states, targets).mean())
    torch.nn.init.kaiming_uniform_(model.value_head.weight, a=math.sqrt(5))  # nn.Linear's init
    random = float(normalized_mse(predict(), targets).mean())
    return {"identity": identity, "random": random}
