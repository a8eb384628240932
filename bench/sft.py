"""SFT training steps: nla-mcore's `sft-av` / `sft-ar` against transformers on the same batches.

Usage (one GPU):  python bench/sft.py [--shapes 1p5b,7b] [--layers-7b 8] [--steps 12] [--json F]
Smoke run (CPU):  python bench/sft.py --smoke

For each shape (Qwen2.5-1.5B, 28 layers; Qwen2.5-7B's width with --layers-7b layers) and stage
(AV-SFT: ~250-token samples, micro-batch 16; AR-SFT: ~126 tokens, micro-batch 64; a global batch
is 4 micro-batches, so every step accumulates gradients; the AR is the first K+1 layers, K =
2·L//3 for the 1.5B shape and L-1 for the 7B-width stack), one after the other on one GPU:

  ours                   a real `nla_mcore.train.sft.run` of N steps (bf16, the distributed
                         optimizer, no evaluation); its metrics.jsonl gives each step's time.
  transformers eager     the same shape and weights in transformers (SDPA), a full step: per
                         micro-batch forward + loss + backward, clip to 1.0 (as ours), fused
                         AdamW step (bf16 state: torch keeps the param dtype; ours keeps fp32
                         main params and moments), zero_grad.  AV loss: cross-entropy on the
                         target tokens with the injected vector spliced into `inputs_embeds` at
                         the marker; AR: `AutoModel` of K+1 layers, final norm -> Identity, last
                         real token -> Linear(d, d) (identity init) -> normalised MSE.
  transformers compiled  the same under torch.compile: `--compile layers` (default) compiles
                         each decoder layer and the loss tail (LM head + CE / read-out + MSE),
                         the embedding and final norm stay eager (one compile serves every
                         layer); `--compile model` compiles the whole loss function (slower to
                         compile).  Every padded length is compiled in a warm-up before timing.

The baselines train on exactly ours' micro-batches: the same parquet read by
`sft_data.load_sft_data` with the same config, `SFTData.plan(step)` and the stage's own
`microbatch()`, as `SFTTask.train_step` does.  Data: synthetic explanations sized to the lengths
above (±10 %, so length bucketing has work) through datagen's build stage; toy qwen2 tokenizer;
random bf16 weights (`bench/shapes.py`) that ours and the baselines both load, so their step-1
losses should agree (loss@1 column).

Columns are medians over steps 4..N.  Ours: `step_time_s` (host clock around `train_step`, which
ends in a host sync on the loss).  Baselines: CUDA events around each step (micro-batches built
on the host beforehand; the copy to the device is inside the step, as in ours).  FLOPs are
`nla_mcore/train/flops.py`'s (6·P_matmul·Σs + 12·L·h_attn·Σs², real tokens only, so padding
lowers MFU), the same number for every implementation of a step; MFU is against 989 TFLOP/s
(dense bf16, H100/H200) and against a bf16 8192³ GEMM timed in this run (/GEMM).  Peak memory:
ours' largest per-step `mem_gib` (the loop resets the peak each step), a baseline's
`max_memory_allocated` from load to last step; weights included.  The throughput runs skip
the final checkpoint save (`checkpoint.every=0` still saves at the end; nothing here reads it).

Checkpoint phase (7B-width AV): ours again with `checkpoint.every=4`, async saves, output in
--ckpt-dir (local disk): per save, what the step waited for (`stall_s` of the loop's event,
plus any wait for the previous save, which that number leaves out), when it committed, step
times right after a save vs the others, and the final save's duration (it is synchronous:
`async_save=false`'s path).  Before each save the bench deletes the previous, committed
checkpoint, so that one checkpoint at a time (~41 GB at 8 layers: 14 bytes per parameter) fits
the GPU machine's 64 GiB disk; the phase is skipped, saying so, when the disk has no room.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# `python bench/sft.py` puts bench/ first on sys.path, where bench/kernels.py would stand in for
# the `kernels` distribution that transformers imports when it is installed; the root instead.
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.model_step import gemm_tflops, time_cuda  # noqa: E402
from bench.shapes import QWEN25_1P5B, QWEN25_7B_WIDTH, write_random_hf_model  # noqa: E402

PEAK_TFLOPS = 989.0  # nla_mcore.train.flops.PEAK_BF16_TFLOPS["H200"]
FIRST_MEASURED_STEP = 4
MICRO_BATCHES_PER_STEP = 4
INJECTION_SCALE = 150.0  # Qwen2.5-7B's (NLA.md); the step costs the same at any scale
STALL_GOAL_S = 5.0
BYTES_PER_PARAM_IN_CHECKPOINT = 14  # bf16 weights + fp32 main params + two fp32 Adam moments
SHAPES = {"1p5b": QWEN25_1P5B, "7b": QWEN25_7B_WIDTH}
IMPL_NAMES = {"ours": "ours", "eager": "transformers eager", "compiled": "transformers compiled"}
SMOKE_WIDTH = dict(
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=4096,
)
WORDS = (
    "the text is about cats and dogs rivers lakes numbers counting music songs it was written in "
    "a formal playful tone question final token describes feature sentence word story water "
    "animal sound"
).split()


@dataclass(frozen=True)
class Stage:
    role: str  # "av" | "ar"
    mean_tokens: int
    micro_batch: int

    @property
    def split(self) -> str:
        return f"{self.role}_sft"


STAGES = {"av": Stage("av", 250, 16), "ar": Stage("ar", 126, 64)}


@dataclass(frozen=True)
class Shape:
    name: str
    hf: dict
    layers: int
    ar_layer: int  # K: the AR is layers 0..K


@dataclass(frozen=True)
class Settings:
    device: str
    dtype: str
    steps: int
    micro: dict
    """Micro-batch size by role."""
    impls: tuple
    compile: str
    compile_backend: str

    def global_batch(self, role: str) -> int:
        return MICRO_BATCHES_PER_STEP * self.micro[role]


@dataclass
class StepStats:
    """Per-step measurements of one implementation over steps 1..N."""

    seconds: list
    tokens: list
    flops: list
    padding: list
    losses: list


@dataclass
class Row:
    shape: str
    stage: str
    impl: str
    ms: float | None = None
    tokens_per_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    per_gemm: float | None = None
    padding: float | None = None
    peak_gib: float | None = None
    loss_1: float | None = None
    ours_speedup: float | None = None
    """Baseline ms / ours' ms (> 1: ours is faster)."""
    wall_s: float | None = None
    step_ms: list = field(default_factory=list)
    """Every step's time, steps 1..N (JSON only)."""
    note: str = ""
    error: str | None = None


@dataclass
class Report:
    path: Path | None
    header: dict
    rows: list = field(default_factory=list)
    data: dict = field(default_factory=dict)
    checkpoint: dict | None = None

    def save(self) -> None:
        """Written after every row, so a run cut short still leaves its numbers."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {**self.header, "data": self.data, "rows": [asdict(r) for r in self.rows]}
        body["checkpoint"] = self.checkpoint
        self.path.write_text(json.dumps(body, indent=1))


# --- data and models -----------------------------------------------------------------------------


def sample_overhead(tokenizer, role: str) -> int:
    """Tokens of a sample besides its explanation, with the canonical templates."""
    from nla_mcore.datagen.datagen_config import BuildConfig
    from nla_mcore.prompts import ar_prompt_ids, av_prompt_ids, format_av_target, select_marker

    if role == "ar":
        return len(ar_prompt_ids(tokenizer, "", BuildConfig().ar_template))
    marker = select_marker(tokenizer).char
    prompt = av_prompt_ids(tokenizer, marker, BuildConfig().av_template)
    target = tokenizer.encode(format_av_target(""), add_special_tokens=False)
    return len(prompt) + len(target) + 1  # + the end-of-turn token


def sized_explanations(tokenizer, n: int, stage: Stage, seed: int) -> list[str]:
    """Word salads that make samples of `stage.mean_tokens` ± 10 % tokens (a space-led word's
    tokens add up; the report shows the lengths the tokenizer really gives)."""
    rng = np.random.default_rng(seed)
    cost = np.array([len(tokenizer.encode(" " + w, add_special_tokens=False)) for w in WORDS])
    overhead = sample_overhead(tokenizer, stage.role)
    low, high = round(0.9 * stage.mean_tokens), round(1.1 * stage.mean_tokens)
    texts = []
    for total in rng.integers(low, high + 1, size=n):
        target = max(4, int(total) - overhead)
        picks = rng.integers(len(WORDS), size=target)  # every word is >= 1 token
        count = int(np.searchsorted(np.cumsum(cost[picks]), target)) + 1
        texts.append(" ".join(WORDS[i] for i in picks[:count]))
    return texts


def write_training_file(directory: Path, tokenizer, shape: Shape, stage: Stage, n: int) -> Path:
    """A real {av,ar}_sft.parquet, made by datagen's build stage from an "explained" split."""
    from nla_mcore.datagen.build import build_split
    from nla_mcore.datagen.datagen_config import BuildConfig
    from tests.train.sft_toys import write_explained

    seed = {"av": 1, "ar": 2}[stage.role]
    vectors = np.random.default_rng(seed).standard_normal((n, shape.hf["hidden_size"]))
    explained = write_explained(
        directory / f"{stage.role}_explained.parquet",
        tokenizer,
        vectors_ND=vectors.astype(np.float32),
        explanations=sized_explanations(tokenizer, n, stage, seed),
        doc_ids=[f"doc-{i}" for i in range(n)],
        layer=shape.ar_layer,
    )
    out = directory / f"{stage.split}.parquet"
    build_split(BuildConfig(progress=False), stage.split, explained, out, tokenizer)
    return out


def write_model(directory: Path, shape: Shape, device: str) -> float:
    """Random bf16 weights + the toy tokenizer; returns the size in GiB."""
    from nla_mcore.toy_tokenizers import save_toy_tokenizer

    gib = write_random_hf_model(directory, shape.layers, device, shape.hf)
    save_toy_tokenizer("qwen2", directory)
    free_memory()
    return gib


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- ours ----------------------------------------------------------------------------------------


def ours_overrides(
    model_dir: Path, data_file: Path, out_dir: Path, stage: Stage, settings: Settings, steps: int
) -> list[str]:
    extra = [f"model.injection_scale={INJECTION_SCALE}"] if stage.role == "av" else []
    return [
        f"model.source={model_dir}",
        f"data.train_file={data_file}",
        f"output_dir={out_dir}",
        f"device={settings.device}",
        f"model.dtype={settings.dtype}",
        f"train.steps={steps}",
        f"train.global_batch_size={settings.global_batch(stage.role)}",
        f"train.micro_batch_size={settings.micro[stage.role]}",
        "optim.distributed=true",
        "checkpoint.every=0",
        "checkpoint.async_save=false",
        "export.enabled=false",
        "logging.plot=false",
        "logging.progress=false",
        "train.eval_every=0",
        "data.eval_fraction=0",
        "data.max_length=1024",
        *extra,
    ]


def load_cfg(role: str, overrides: list[str]):
    from nla_mcore.config import load_config
    from nla_mcore.train.sft_config import ARSFTConfig, AVSFTConfig

    return load_config(ARSFTConfig if role == "ar" else AVSFTConfig, None, overrides)


@dataclass
class SaveLog:
    saves: list = field(default_factory=list)
    commits: list = field(default_factory=list)


@contextlib.contextmanager
def recorded_checkpoints(*, skip_final: bool, prune_before_save: bool):
    """Time every `Checkpointer` save and commit (one rank); optionally skip the final save or
    delete committed checkpoints before the next save (disk room). Restores the class after."""
    from nla_mcore.train.checkpointing import Checkpointer, SaveReport

    log = SaveLog()
    save, poll, wait = Checkpointer.save, Checkpointer.poll, Checkpointer.wait

    def timed_poll(self):
        step = poll(self)
        if step is not None:
            log.commits.append(dict(step=step, at=time.perf_counter(), how="poll"))
        return step

    def timed_wait(self):
        started = time.perf_counter()
        step = wait(self)
        if step is not None:
            now = time.perf_counter()
            log.commits.append(dict(step=step, at=now, how="wait", waited_s=now - started))
        return step

    def timed_save(self, step, models, train_state, *, final=False):
        if final and skip_final:
            return SaveReport(stall_s=0.0, previous_s=0.0, committed=None)
        started = time.perf_counter()
        self.wait()
        waited = time.perf_counter() - started
        pruned = prune_committed(self) if prune_before_save else 0.0
        begun = time.perf_counter()
        report = save(self, step, models, train_state, final=final)
        log.saves.append(
            dict(
                step=step,
                final=final,
                asynchronous=self.cfg.async_save and not final,
                begun=begun,
                waited_s=waited,
                pruned_s=pruned,
                stall_s=report.stall_s,
                call_s=time.perf_counter() - begun,
            )
        )
        return report

    Checkpointer.save, Checkpointer.poll, Checkpointer.wait = timed_save, timed_poll, timed_wait
    try:
        yield log
    finally:
        Checkpointer.save, Checkpointer.poll, Checkpointer.wait = save, poll, wait


def prune_committed(ckpt) -> float:
    """Delete every complete checkpoint of this (one-rank) run; returns the seconds it took."""
    started = time.perf_counter()
    for _, path in ckpt.complete_steps():
        shutil.rmtree(path)
    return time.perf_counter() - started


def run_ours(role: str, overrides: list[str]) -> tuple[Path, float | None]:
    """One `sft.run`; (its metrics file, peak GiB on CUDA)."""
    from nla_mcore.train.metrics import METRICS_FILE
    from nla_mcore.train.sft import run

    cfg = load_cfg(role, overrides)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run(cfg, role)
    tail = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return Path(cfg.output_dir) / METRICS_FILE, tail


def records(path: Path, kind: str) -> list[dict]:
    """Every record of `kind` in file order (`read_metrics` keeps one per step and kind)."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record["kind"] == kind:
                out.append(record)
    return out


def ours_stats(metrics_file: Path) -> tuple[StepStats, float | None]:
    """(per-step values, the largest per-step peak GiB on CUDA)."""
    train = sorted(records(metrics_file, "train"), key=lambda r: r["step"])
    stats = StepStats(
        seconds=[r["step_time_s"] for r in train],
        tokens=[r["tokens"] for r in train],
        flops=[r["flops"] for r in train],
        padding=[r["padding"] for r in train],
        losses=[r["loss"] for r in train],
    )
    peaks = [r["mem_gib"] for r in train if r.get("mem_gib") is not None]
    return stats, (max(peaks) if peaks and torch.cuda.is_available() else None)


# --- the baselines -------------------------------------------------------------------------------


@dataclass
class PlannedStep:
    """One step's micro-batches (ours' tensors, on the host) and what it is worth."""

    microbatches: list
    tokens: int
    flops: float
    padding: float


def load_data(role: str, overrides: list[str], hf):
    """The run's `SFTData`, read exactly as `sft.run` reads it (one data-parallel rank)."""
    from transformers import AutoTokenizer

    from nla_mcore.train.sft_data import load_sft_data

    cfg = load_cfg(role, overrides)
    return load_sft_data(
        cfg,
        STAGES[role].split,
        AutoTokenizer.from_pretrained(cfg.model.source),
        d_model=hf.hidden_size,
        extraction_layer=None,
        dp=1,
        pad_multiple=cfg.data.pad_multiple,
    )


def planned_steps(data, role: str, hf, depth: int, steps: int) -> list[PlannedStep]:
    """Steps 1..N as `SFTTask.train_step` cuts them, with its stage's batches and FLOPs."""
    from nla_mcore.data.batching import padding_fraction
    from nla_mcore.train.sft import ARStage, AVStage

    stage = (
        AVStage(
            tokens=data.rows.sidecar.tokens,
            vocab_size=hf.vocab_size,
            injection_scale=INJECTION_SCALE,
        )
        if role == "av"
        else ARStage(mse_scale=None)
    )
    out = []
    for step in range(1, steps + 1):
        plans = data.plan(step)
        (mine,) = plans
        microbatches = [
            stage.microbatch(data.train, samples, length, data.pad_id)
            for samples, length in zip(mine.samples, mine.lengths, strict=True)
        ]
        lengths = data.train.lengths_N[np.concatenate(mine.samples)]
        flops = stage.flops(hf, lengths.tolist(), depth)
        out.append(PlannedStep(microbatches, int(lengths.sum()), flops, padding_fraction(plans)))
    return out


def av_inputs(mb: dict, vocab_size: int, count: torch.Tensor) -> dict:
    """transformers inputs of an AV micro-batch: ids with the marker's virtual id replaced,
    where to splice the (already rescaled) vector, and labels for HF's shifting loss."""
    virtual_BS = mb["tokens"] >= vocab_size
    targets_BS = mb["labels"].masked_fill(mb["loss_mask"] == 0, -100)
    return dict(
        ids=mb["tokens"].masked_fill(virtual_BS, 0),
        marker_B=virtual_BS.int().argmax(dim=1),
        injection_BD=mb["injection"],
        position_ids=mb["position_ids"],
        labels=torch.roll(targets_BS, shifts=1, dims=1),  # HF predicts labels[t + 1] at t
        count=count,
    )


def ar_inputs(mb: dict, count: torch.Tensor) -> dict:
    return dict(
        ids=mb["tokens"],
        position_ids=mb["position_ids"],
        readout_B=mb["readout_index"],
        target_BD=mb["target"],
        count=count,
    )


def baseline_inputs(step: PlannedStep, role: str, vocab_size: int) -> list[dict]:
    """Every micro-batch of a step; `count` is the step's loss denominator (target tokens or
    samples), so the summed micro-batch losses are the step's mean, as ours reduces it."""
    if role == "av":
        count = torch.tensor(float(sum(mb["loss_mask"].sum() for mb in step.microbatches)))
        return [av_inputs(mb, vocab_size, count) for mb in step.microbatches]
    count = torch.tensor(float(sum(len(mb["tokens"]) for mb in step.microbatches)))
    return [ar_inputs(mb, count) for mb in step.microbatches]


def hf_models(model_dir: Path, shape: Shape, role: str, settings: Settings):
    """(transformers model in training mode, AR head or None), weights as ours loads them."""
    from transformers import AutoModel, AutoModelForCausalLM

    dtype = getattr(torch, settings.dtype)
    kwargs = dict(dtype=dtype, attn_implementation="sdpa")
    if role == "av":
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        return model.to(settings.device).train(), None
    model = AutoModel.from_pretrained(model_dir, num_hidden_layers=shape.ar_layer + 1, **kwargs)
    model.norm = torch.nn.Identity()  # the AR reads block K's output itself
    d = model.config.hidden_size
    head = torch.nn.Linear(d, d, bias=False, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.eye(d))
    return model.to(settings.device).train(), head.to(settings.device)


def av_head_loss(model, hidden_BSD, labels_BS, count):
    """LM head + HF's causal-LM loss (summed over target tokens / the step's count)."""
    logits_BSV = model.lm_head(hidden_BSD)
    return model.loss_function(
        logits=logits_BSV,
        labels=labels_BS,
        vocab_size=model.config.vocab_size,
        num_items_in_batch=count,
    )


def ar_readout_loss(head, hidden_BSD, readout_B, target_BD, count):
    from nla_mcore.kernels import normalized_mse_reference

    rows_B = torch.arange(hidden_BSD.shape[0], device=hidden_BSD.device)
    pred_BD = head(hidden_BSD[rows_B, readout_B])
    return normalized_mse_reference(pred_BD, target_BD).sum() / count


def loss_function(model, head, role: str, compile_mode: str | None, backend: str):
    """`loss(**inputs)` of one micro-batch; compiled as `compile_mode` says (None: eager)."""
    body = model.model if role == "av" else model
    tail = av_head_loss if role == "av" else ar_readout_loss
    if compile_mode == "layers":
        for layer in body.layers:
            layer.compile(backend=backend)
        tail = torch.compile(tail, backend=backend)

    def av_loss(ids, marker_B, injection_BD, position_ids, labels, count):
        embeds_BSD = body.embed_tokens(ids)
        rows_B = torch.arange(ids.shape[0], device=ids.device)
        embeds_BSD = embeds_BSD.index_put((rows_B, marker_B), injection_BD.to(embeds_BSD.dtype))
        out = body(inputs_embeds=embeds_BSD, position_ids=position_ids, use_cache=False)
        return tail(model, out.last_hidden_state, labels, count)

    def ar_loss(ids, position_ids, readout_B, target_BD, count):
        out = body(input_ids=ids, position_ids=position_ids, use_cache=False)
        return tail(head, out.last_hidden_state, readout_B, target_BD, count)

    loss = av_loss if role == "av" else ar_loss
    if compile_mode != "model":
        return loss
    compiled = torch.compile(loss, backend=backend)

    def marked(**inputs):
        for key in ("ids", "position_ids", "labels"):
            if key in inputs:
                torch._dynamo.maybe_mark_dynamic(inputs[key], 1)  # one graph for all lengths
        return compiled(**inputs)

    return marked


def train_step(loss, optimizer, params, microbatches: list[dict], device: str) -> torch.Tensor:
    """Forward + loss + backward per micro-batch, clip, AdamW step, zero_grad; the step's loss."""
    total = torch.zeros((), device=device)
    for mb in microbatches:
        value = loss(**{k: v.to(device) for k, v in mb.items()})
        value.backward()
        total += value.detach().float()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def timed(fn, device: str) -> float:
    """Seconds of one call: CUDA events on the GPU, the host clock on the CPU."""
    if device == "cuda":
        return time_cuda(fn, warmup=0, iters=1) / 1e3
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def timed_steps(loss, optimizer, params, steps: list, device: str) -> tuple[list, list]:
    """(seconds, loss) of every step, in order."""
    seconds, losses = [], []
    for microbatches in steps:
        result = {}

        def step(microbatches=microbatches, result=result):
            result["loss"] = train_step(loss, optimizer, params, microbatches, device)

        seconds.append(timed(step, device))
        losses.append(float(result["loss"]))
    return seconds, losses


def compile_warmup(loss, steps: list[list[dict]], device: str) -> tuple[int, float]:
    """Forward + backward once per distinct padded length (then drop the gradients), so that
    the timed steps meet no compile; (lengths, seconds)."""
    seen = {}
    for microbatches in steps:
        for mb in microbatches:
            seen.setdefault(tuple(mb["ids"].shape), mb)
    started = time.perf_counter()
    for mb in seen.values():
        loss(**{k: v.to(device) for k, v in mb.items()}).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return len(seen), time.perf_counter() - started


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_baseline(
    impl: str, model_dir: Path, shape: Shape, role: str, planned: list, settings: Settings
) -> tuple[StepStats, float | None, str]:
    """N full training steps in transformers on ours' batches; (stats, peak GiB, note)."""
    cuda = settings.device == "cuda"
    free_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model, head = hf_models(model_dir, shape, role, settings)
    params = [p for m in (model, head) if m is not None for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    mode = settings.compile if impl == "compiled" else None
    loss = loss_function(model, head, role, mode, settings.compile_backend)
    steps = [baseline_inputs(p, role, model.config.vocab_size) for p in planned]
    note = ""
    if mode is not None:
        lengths, seconds = compile_warmup(loss, steps, settings.device)
        optimizer.zero_grad(set_to_none=True)
        note = f"compile ({mode}) + warm-up over {lengths} lengths {seconds:.0f} s"
    graphs = graphs_compiled()
    seconds, losses = timed_steps(loss, optimizer, params, steps, settings.device)
    if mode is not None:
        note += f"; graphs compiled during the timed steps: {graphs_compiled() - graphs}"
        torch._dynamo.reset()  # its caches hold on to this model
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    stats = StepStats(
        seconds=seconds,
        tokens=[p.tokens for p in planned],
        flops=[p.flops for p in planned],
        padding=[p.padding for p in planned],
        losses=losses,
    )
    return stats, peak, note


# --- rows and the table --------------------------------------------------------------------------


def measured(values: list) -> list:
    """Steps FIRST_MEASURED_STEP..N (the last one when the run is shorter)."""
    return values[min(FIRST_MEASURED_STEP, len(values)) - 1 :]


def fill_row(row: Row, stats: StepStats, peak: float | None, gemm: float | None) -> Row:
    seconds = measured(stats.seconds)
    tokens, flops = measured(stats.tokens), measured(stats.flops)
    row.ms = statistics.median(seconds) * 1e3
    row.tokens_per_s = statistics.median(t / s for t, s in zip(tokens, seconds, strict=True))
    row.tflops = statistics.median(f / s / 1e12 for f, s in zip(flops, seconds, strict=True))
    row.mfu = row.tflops / PEAK_TFLOPS
    row.per_gemm = row.tflops / gemm if gemm else None
    row.padding = statistics.median(measured(stats.padding))
    row.peak_gib = peak
    row.loss_1 = stats.losses[0]
    row.step_ms = [round(t * 1e3, 2) for t in stats.seconds]
    return row


def error_text(err: BaseException) -> str:
    traceback.print_exc()
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:160]}"


def fmt(value, spec: str, missing: str = "-") -> str:
    """`value` formatted; `missing` right-aligned to the spec's width when it is None."""
    if value is not None:
        return format(value, spec)
    width = "".join(c for c in spec.split(".")[0] if c.isdigit())
    return missing.rjust(int(width or 0))


def print_table(rows: list[Row]) -> None:
    print(
        f"\n{'shape':6} {'stage':5} {'impl':22} {'ms/step':>9} {'tokens/s':>10} {'TFLOP/s':>8} "
        f"{'MFU@989':>8} {'/GEMM':>6} {'padding':>7} {'peak GiB':>8} {'loss@1':>8} {'ours x':>7}"
    )
    for r in rows:
        head = f"{r.shape:6} {r.stage:5} {r.impl:22}"
        if r.error:
            print(f"{head} error: {r.error}")
            continue
        print(
            f"{head} {r.ms:9.1f} {r.tokens_per_s:10,.0f} {r.tflops:8.1f} {r.mfu:8.1%} "
            f"{fmt(r.per_gemm, '6.1%')} {r.padding:7.1%} {fmt(r.peak_gib, '8.1f')} "
            f"{r.loss_1:8.4f} {fmt(r.ours_speedup, '6.2f', '')}{'x' if r.ours_speedup else ''}"
        )
    print("ours x = baseline ms / ours' ms (above 1: ours is faster).")
    for r in rows:
        if r.note or r.wall_s is not None:
            print(f"  {r.shape} {r.stage} {r.impl}: {fmt(r.wall_s, '.0f')} s wall. {r.note}")


# --- the checkpoint phase ------------------------------------------------------------------------


def checkpoint_bytes(model_dir: Path) -> int:
    """Estimated size of one training checkpoint (bf16 weights on disk -> parameter count)."""
    params = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) // 2
    return params * BYTES_PER_PARAM_IN_CHECKPOINT


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def checkpoint_summary(metrics_file: Path, log: SaveLog, size: int) -> dict:
    """Stall per save, commit times, step times after a save vs others, the sync save."""
    times = {r["step"]: r["step_time_s"] for r in records(metrics_file, "train")}
    events = {r["step"]: r["stall_s"] for r in records(metrics_file, "event") if "stall_s" in r}
    commits = {c["step"]: c for c in log.commits}
    saves = []
    for s in (s for s in log.saves if s["asynchronous"]):
        commit = commits.get(s["step"])
        saves.append(
            dict(
                step=s["step"],
                event_stall_s=events.get(s["step"]),
                waited_for_previous_s=s["waited_s"],
                blocked_s=s["stall_s"] + s["waited_s"],
                committed_after_s=None if commit is None else commit["at"] - s["begun"],
                committed_by=None if commit is None else commit["how"],
                pruned_s=s["pruned_s"],
            )
        )
    after = sorted({s["step"] + 1 for s in saves} & set(times))
    others = [t for step, t in times.items() if step >= FIRST_MEASURED_STEP and step not in after]
    final = [s for s in log.saves if s["final"]]
    return dict(
        saves=saves,
        steps_after_save=after,
        median_ms_after_save=median_ms([times[step] for step in after]),
        median_ms_other=median_ms(others),
        sync_save_s=final[0]["call_s"] if final else None,
        checkpoint_gib=size / 2**30,
        max_blocked_s=max((s["blocked_s"] for s in saves), default=None),
        step_ms={step: round(t * 1e3, 2) for step, t in sorted(times.items())},
    )


def median_ms(seconds: list) -> float | None:
    return statistics.median(seconds) * 1e3 if seconds else None


def run_checkpoint_phase(
    shape: Shape, model_dir: Path, data_file: Path, settings: Settings, args
) -> dict:
    """Ours (AV) with async saves every `args.ckpt_every` steps, in a fresh dir on local disk."""
    from nla_mcore.train.metrics import METRICS_FILE

    root = Path(args.ckpt_dir)
    needed, free = checkpoint_bytes(model_dir), shutil.disk_usage(root).free
    where = dict(
        dir=str(root),
        every=args.ckpt_every,
        steps=args.ckpt_steps,
        shape=shape.name,
        settings=list(args.ckpt_set),
    )
    if free < 1.1 * needed:
        return dict(
            where,
            error=f"skipped: one checkpoint needs ~{needed / 2**30:.0f} GiB, "
            f"{root} has {free / 2**30:.0f} GiB free",
        )
    out_dir = Path(tempfile.mkdtemp(prefix="bench_sft_ckpt_", dir=root))
    overrides = ours_overrides(
        model_dir, data_file, out_dir, STAGES["av"], settings, args.ckpt_steps
    ) + [f"checkpoint.every={args.ckpt_every}", "checkpoint.async_save=true", *args.ckpt_set]
    try:
        with recorded_checkpoints(skip_final=False, prune_before_save=True) as log:
            run_ours("av", overrides)
        size = directory_bytes(out_dir / "checkpoints")
        return dict(where, **checkpoint_summary(out_dir / METRICS_FILE, log, size))
    except Exception as err:  # report it, keep the table
        return dict(where, error=error_text(err))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        free_memory()


def print_checkpoint(result: dict) -> None:
    print(
        f"\nAsync checkpoint stall ({result['shape']}, AV, checkpoint.every={result['every']}, "
        f"{result['steps']} steps, in {result['dir']}):"
    )
    if "error" in result:
        print(f"  error: {result['error']}")
        return
    print(f"  checkpoint size {result['checkpoint_gib']:.2f} GiB")
    for s in result["saves"]:
        committed = (
            "not committed"
            if s["committed_after_s"] is None
            else f"committed {s['committed_after_s']:.1f} s after it started (seen by "
            f"{'a poll after a step' if s['committed_by'] == 'poll' else 'the next save'})"
        )
        print(
            f"  save at step {s['step']}: the step waited {s['blocked_s']:.2f} s (stall_s "
            f"{fmt(s['event_stall_s'], '.2f')} + {s['waited_for_previous_s']:.2f} s for the "
            f"previous save); {committed}; deleting the previous one took {s['pruned_s']:.1f} s"
        )
    print(
        f"  steps right after a save started {result['steps_after_save']}: median "
        f"{fmt(result['median_ms_after_save'], '.1f')} ms; other steps >= {FIRST_MEASURED_STEP}: "
        f"{fmt(result['median_ms_other'], '.1f')} ms"
    )
    print(
        f"  synchronous save (the final one; async_save=false's path): "
        f"{fmt(result['sync_save_s'], '.1f')} s"
    )
    worst = result["max_blocked_s"]
    if worst is not None:
        verdict = "met" if worst <= STALL_GOAL_S else "NOT met"
        print(f"  goal: stall <= {STALL_GOAL_S:.0f} s: {verdict} (longest {worst:.2f} s)")


# --- one shape -----------------------------------------------------------------------------------


def bench_stage(shape, stage, model_dir: Path, data_file: Path, work: Path, settings, report):
    """Ours, then each baseline, on one stage; rows go into `report` as they finish."""
    from nla_mcore.models.hf_config import load_hf_config

    hf = load_hf_config(model_dir)
    depth = shape.ar_layer + 1 if stage.role == "ar" else shape.layers
    overrides = ours_overrides(
        model_dir, data_file, work / stage.role, stage, settings, settings.steps
    )
    data = load_data(stage.role, overrides, hf)
    lengths = data.train.lengths_N
    key = f"{shape.name}/{stage.role}"
    report.data[key] = dict(
        samples=len(lengths),
        mean_tokens=float(lengths.mean()),
        min_tokens=int(lengths.min()),
        max_tokens=int(lengths.max()),
    )
    print(
        f"[bench-sft] {key}: {len(lengths)} samples of {lengths.mean():.1f} tokens "
        f"({lengths.min()}..{lengths.max()})",
        flush=True,
    )
    planned = planned_steps(data, stage.role, hf, depth, settings.steps)
    ours = None
    for impl in settings.impls:
        row = bench_impl(impl, shape, stage, model_dir, overrides, planned, settings, report)
        if impl == "ours" and row.error is None:
            ours = row
        elif ours is not None and row.error is None:
            row.ours_speedup = row.ms / ours.ms
        report.rows.append(row)
        report.save()
        free_memory()
        left = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        print(f"[bench-sft] {key} {row.impl}: {row.wall_s:.0f} s; {left:.1f} GiB left allocated")


def bench_impl(impl, shape, stage, model_dir, overrides, planned, settings, report) -> Row:
    """One implementation's row (its error in place of numbers if it fails)."""
    row = Row(shape.name, stage.role, IMPL_NAMES[impl])
    started = time.perf_counter()
    try:
        if impl == "ours":
            stats, peak = measure_ours(stage.role, overrides)
            same = stats.tokens == [p.tokens for p in planned]
            if not same or stats.flops != [p.flops for p in planned]:
                row.note = "WARNING: ours' steps differ from the batches the baselines train on"
        else:
            stats, peak, row.note = run_baseline(
                impl, model_dir, shape, stage.role, planned, settings
            )
        fill_row(row, stats, peak, report.header.get("gemm_tflops"))
    except Exception as err:  # a failing implementation is a row, not the end of the run
        row.error = error_text(err)
    row.wall_s = time.perf_counter() - started
    return row


def measure_ours(role: str, overrides: list[str]) -> tuple[StepStats, float | None]:
    """A throughput run of ours (no checkpoint at all); its steps and peak memory."""
    with recorded_checkpoints(skip_final=True, prune_before_save=False):
        metrics_file, after_steps = run_ours(role, overrides)
    stats, peak = ours_stats(metrics_file)
    peaks = [p for p in (peak, after_steps) if p is not None]
    return stats, max(peaks) if peaks else None


def bench_shape(shape: Shape, settings: Settings, args, report: Report, root: Path) -> None:
    """Write the model and data of `shape`, run its stages (and the checkpoint phase); clean up."""
    from transformers import AutoTokenizer

    work = root / shape.name
    model_dir = work / "hf"
    gib = write_model(model_dir, shape, settings.device)
    print(
        f"[bench-sft] {shape.name}: {shape.layers} layers, d {shape.hf['hidden_size']}, "
        f"AR K={shape.ar_layer} ({shape.ar_layer + 1} layers), {gib:.1f} GiB of bf16 weights",
        flush=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    checkpoint = args.checkpoint and shape.name == "7b"
    files = {}
    try:
        for role in args.stages + (["av"] if checkpoint else []):
            if role in files:
                continue
            steps = max(settings.steps, args.ckpt_steps if checkpoint and role == "av" else 0)
            n = settings.global_batch(role) * steps  # no sample twice in a run
            files[role] = write_training_file(work / "data", tokenizer, shape, STAGES[role], n)
        for role in args.stages:
            bench_stage(
                shape, STAGES[role], model_dir, files[role], work / "runs", settings, report
            )
        if checkpoint:
            report.checkpoint = run_checkpoint_phase(shape, model_dir, files["av"], settings, args)
            report.save()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_shapes(names: list[str], layers_7b: int, smoke: bool) -> list[Shape]:
    from nla_mcore.prompts import default_extraction_layer

    out = []
    for name in names:
        hf = SHAPES[name]
        layers = layers_7b if name == "7b" else hf["num_hidden_layers"]
        if smoke:
            hf, layers = {**hf, **SMOKE_WIDTH}, 2
        k = layers - 1 if name == "7b" else default_extraction_layer(layers)
        out.append(Shape(name, hf, layers, k))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1p5b,7b", help="comma list of 1p5b, 7b")
    parser.add_argument("--layers-7b", type=int, default=8, help="layers of the 7B-width stack")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (12; smoke 3)")
    parser.add_argument("--stages", default="av,ar", help="comma list of av, ar")
    parser.add_argument(
        "--impls", default=None, help="comma list of ours, eager, compiled (smoke: no compiled)"
    )
    parser.add_argument(
        "--compile",
        choices=["layers", "model"],
        default="layers",
        help="what torch.compile wraps: each decoder layer + the loss tail, or the whole loss",
    )
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument(
        "--checkpoint",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the async checkpoint phase (7b shape)",
    )
    parser.add_argument("--ckpt-dir", default="/tmp", help="local disk for its checkpoints")
    parser.add_argument("--ckpt-every", type=int, default=None, help="save every (4; smoke 1)")
    parser.add_argument(
        "--ckpt-set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra config for the checkpoint phase, e.g. checkpoint.pinned_register_threads=0",
    )
    parser.add_argument("--ckpt-steps", type=int, default=None, help="its steps (12; smoke 3)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, fp32")
    parser.add_argument("--json", default=None, help="rows as JSON (default $OUT/bench-sft.json)")
    args = parser.parse_args(argv)
    small = args.smoke
    args.steps = args.steps or (3 if small else 12)
    args.ckpt_steps = args.ckpt_steps or (3 if small else 12)
    args.ckpt_every = args.ckpt_every or (1 if small else 4)
    args.impls = (args.impls or ("ours,eager" if small else "ours,eager,compiled")).split(",")
    args.shapes, args.stages = args.shapes.split(","), args.stages.split(",")
    for key, allowed in (("shapes", SHAPES), ("stages", STAGES), ("impls", IMPL_NAMES)):
        unknown = set(getattr(args, key)) - set(allowed)
        if unknown:
            parser.error(f"--{key}: unknown {sorted(unknown)}; choose from {list(allowed)}")
    if args.json is None and os.environ.get("OUT"):
        args.json = str(Path(os.environ["OUT"]) / "bench-sft.json")
    return args


def make_settings(args) -> Settings:
    micro = {role: 2 if args.smoke else s.micro_batch for role, s in STAGES.items()}
    return Settings(
        device="cpu" if args.smoke else "cuda",
        dtype="float32" if args.smoke else "bfloat16",
        steps=args.steps,
        micro=micro,
        impls=tuple(args.impls),
        compile=args.compile,
        compile_backend=args.compile_backend,
    )


def quiet_transformers() -> None:
    """No load reports (an AR of K+1 layers leaves the rest "unexpected") or progress bars."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def header(settings: Settings) -> dict:
    import megatron.core
    import transformers

    cuda = settings.device == "cuda"
    return dict(
        command=shlex.join([sys.executable, *sys.argv]),
        torch=torch.__version__,
        transformers=transformers.__version__,
        megatron_core=megatron.core.__version__,
        device=torch.cuda.get_device_name() if cuda else "CPU",
        peak_tflops=PEAK_TFLOPS,
        settings=asdict(settings),
    )


def main(argv: list[str] | None = None) -> None:
    from nla_mcore.runtime.distributed import init_distributed
    from nla_mcore.runtime.noise import silence_known_warnings

    args = parse_args(argv)
    settings = make_settings(args)
    silence_known_warnings()
    init_distributed(settings.device)  # before CUDA is touched (a world of one)
    quiet_transformers()
    for key in ("recompile_limit", "cache_size_limit"):  # the name changed in torch 2.x
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, 64)  # padded lengths x models, with room
    report = Report(Path(args.json) if args.json else None, header(settings))
    h = report.header
    print(f"[bench-sft] {h['command']}")
    print(
        f"[bench-sft] {h['device']}; torch {h['torch']}, transformers {h['transformers']}, "
        f"megatron-core {h['megatron_core']}; {settings.dtype}, {settings.steps} steps, "
        f"medians of steps {min(FIRST_MEASURED_STEP, settings.steps)}..{settings.steps}",
        flush=True,
    )
    if settings.device == "cuda":
        h["gemm_tflops"] = gemm_tflops()
        print(f"[bench-sft] bf16 GEMM 8192^3: {h['gemm_tflops']:.0f} TFLOP/s (this run)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        for shape in bench_shapes(args.shapes, args.layers_7b, args.smoke):
            bench_shape(shape, settings, args, report, Path(tmp))
    h["wall_s"] = time.perf_counter() - started
    report.save()
    print(f"\n{h['command']}\n{h['device']}; torch {h['torch']}, transformers {h['transformers']}")
    print(
        f"bf16 GEMM 8192^3: {fmt(h.get('gemm_tflops'), '.0f')} TFLOP/s; total {h['wall_s']:.0f} s"
    )
    print_table(report.rows)
    if report.checkpoint is not None:
        print_checkpoint(report.checkpoint)
    if report.path is not None:
        print(f"\nrows written to {report.path}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
