"""Rank programs and references for the rollout-engine tests.

The reference is transformers' `generate` with `inputs_embeds`: the prompt's embeddings from
the model's own input embedding (Gemma's sqrt(d) included), the marker's row replaced by the
vector rescaled to INJECTION_SCALE, greedy.  Our side injects through virtual ids
(`models.injection.inject`) into the trainer's Megatron-Core model.
"""

from __future__ import annotations

from pathlib import Path

import torch

INJECTION_SCALE = 40.0


def prompts(hf_dir: Path, vectors_BD: torch.Tensor):
    """(tokens [B, S] with the marker, vectors, Tokens, marker position): one AV prompt each."""
    import transformers

    from nla_mcore.prompts import build_av_prompt, select_marker
    from nla_mcore.sidecar import make_tokens

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    prompt = build_av_prompt(tok, select_marker(tok))
    tokens_BS = torch.tensor([list(prompt.ids)] * len(vectors_BD))
    return tokens_BS, make_tokens(tok), prompt.marker_pos


def hf_greedy(hf_dir, tokens_BS, vectors_BD, marker_pos, new_tokens: int, *, inject=True):
    """(greedy ids [B, T], their log-probs [B, T]); `inject=False` leaves the marker's own
    embedding in place (the control that shows the vector matters)."""
    import transformers

    from nla_mcore.prompts import normalize

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(tokens_BS).clone()
        if inject:
            embeds[:, marker_pos] = normalize(vectors_BD.float(), INJECTION_SCALE)
        out = model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(tokens_BS),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=0,
            output_logits=True,  # raw: `scores` have min_new_tokens' -inf on EOS
            return_dict_in_generate=True,
        )
    logprobs_BTV = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
    return out.sequences, logprobs_BTV.gather(2, out.sequences[..., None])[..., 0]


def engine_rank(hf_dir: str, parallel: dict, runs: list[dict], device: str = "cpu") -> list:
    """Build the AV at `parallel` from `hf_dir`, then per run {tokens, vectors, tokens_meta,
    params, recompute}: the engine's rollout (and, with `recompute`, the trainer's
    teacher-forced log-probs of the sampled tokens at the sampling temperature)."""
    from megatron.core import parallel_state as ps

    from nla_mcore.models.build import make_recipe
    from nla_mcore.models.hf_config import load_hf_config
    from nla_mcore.models.injection import inject
    from nla_mcore.models.nla import build_av
    from nla_mcore.rl.rollout import NativeEngine
    from nla_mcore.runtime.distributed import init_distributed, set_seed
    from nla_mcore.runtime.parallel import ParallelConfig, initialize_model_parallel

    init_distributed(device)
    par = ParallelConfig(**parallel)
    initialize_model_parallel(par)
    set_seed(0)
    recipe = make_recipe(load_hf_config(hf_dir), par, dtype="float32", backend="local")
    model = build_av(recipe, hf_dir=hf_dir)
    MODEL[:] = [model]
    model.train()  # as in the trainer; the engine must put it back so
    engine = NativeEngine(model, vocab_size=recipe.hf.vocab_size)
    batch_sizes = []  # of every forward: the prefill must run B rows, not B*n
    model.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0]))
    results = []
    for run in runs:
        virtual_BS, table_BD = inject(
            run["tokens"],
            run["vectors"],
            tokens=run["meta"],
            vocab_size=recipe.hf.vocab_size,
            injection_scale=INJECTION_SCALE,
        )
        batch_sizes.clear()
        out = engine.generate(virtual_BS, table_BD, run["params"])
        result = dict(
            forward_batch_sizes=list(batch_sizes),
            tokens=out.tokens_NT.cpu(),
            logprobs=out.logprobs_NT.cpu(),
            lengths=out.lengths_N.cpu(),
            finish=out.finish_reasons,
            stats=out.stats,
            training=model.training,
        )
        if run.get("recompute"):  # the trainer's own pass (vocab-parallel log-prob kernel)
            trainer = trainer_logprobs(virtual_BS, table_BD, out, run["params"])
            if ps.is_pipeline_last_stage():
                result["trainer"] = trainer
        if run.get("recompute"):  # every stage takes part; the last one has the result
            recomputed = teacher_forced_logprobs(
                model, virtual_BS, table_BD, out, run["params"], recipe.hf.vocab_size
            )
            if ps.is_pipeline_last_stage():
                result["recomputed"] = recomputed
        # numpy, not tensors: a tensor's shared-memory handle can outlive the rank process
        results.append({k: v.numpy() if torch.is_tensor(v) else v for k, v in result.items()})
    return results  # every rank holds the whole rollout (the recompute: the last stage)


def trainer_logprobs(virtual_BS, table_BD, out, params) -> torch.Tensor | None:
    """[N, T] from `rl.policy`'s forward step (what a GRPO step uses), on the last stage."""
    from functools import partial

    from nla_mcore.rl.policy import response_logprobs_forward_step, rollout_microbatch
    from nla_mcore.train.engine import forward_collect

    batch = rollout_microbatch(virtual_BS, table_BD, out, params.n)
    step = partial(response_logprobs_forward_step, temperature=params.temperature)
    got = forward_collect(MODEL[0], step, [batch], seq_length=batch["tokens"].shape[1])
    return got[0].cpu() if got else None


MODEL: list = []  # this rank's model, for trainer_logprobs


def teacher_forced_logprobs(model, virtual_BS, table_BD, out, params, vocab) -> torch.Tensor:
    """[N, T] log-probs of the rollout's tokens from one full forward (as the trainer computes
    them), at the sampling temperature; 0 after each sample's end."""
    from nla_mcore.train.engine import forward_collect
    from nla_mcore.train.lm import lm_microbatch, logits_forward_step

    n = params.n
    prompts_NS = virtual_BS.repeat_interleave(n, dim=0)
    # each sample keeps its prompt's virtual id (vocab + prompt index), so the table is shared
    seq_NL = torch.cat([prompts_NS, out.tokens_NT.cpu()], dim=1)
    s, t = prompts_NS.shape[1], out.tokens_NT.shape[1]
    pad = (-seq_NL.shape[1]) % 8
    seq_NL = torch.cat([seq_NL, seq_NL[:, -1:].expand(-1, pad)], dim=1)
    batch = {**lm_microbatch(seq_NL), "injection": table_BD}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits_NLV = forward_collect(
            model, logits_forward_step, [batch], seq_length=seq_NL.shape[1]
        )
    model.train(was_training)
    if not logits_NLV:
        return None  # not the last pipeline stage
    logits_NLV = logits_NLV[0]
    logits_NTV = logits_NLV[:, s - 1 : s - 1 + t, :vocab].float()
    if params.temperature > 0:
        logits_NTV = logits_NTV / params.temperature
    logprobs_NT = torch.log_softmax(logits_NTV, -1).gather(2, out.tokens_NT.cpu()[..., None])[
        ..., 0
    ]
    alive_NT = torch.arange(t)[None, :] < out.lengths_N.cpu()[:, None]
    return torch.where(alive_NT, logprobs_NT, 0.0)


def grpo_step_rank(hf_dir: str, parallel: dict, kl_kind: str) -> dict:
    """One GRPO update of the AV on its own rollouts (two micro-batches), at `parallel`:
    the schedule's loss, the independent GRPO maths on the teacher-forced log-probs, the
    gradient norm, and whether the next rollout sees the update."""
    from functools import partial

    from nla_mcore.models.build import make_recipe
    from nla_mcore.models.hf_config import load_hf_config
    from nla_mcore.models.injection import inject
    from nla_mcore.models.nla import build_av
    from nla_mcore.rl import grpo
    from nla_mcore.rl.policy import LOSS_KEY, grpo_forward_step, rollout_microbatch
    from nla_mcore.rl.rollout import NativeEngine, SamplingParams
    from nla_mcore.runtime.distributed import init_distributed, set_seed
    from nla_mcore.runtime.parallel import ParallelConfig, initialize_model_parallel
    from nla_mcore.train.engine import forward_backward, wrap_ddp
    from nla_mcore.train.optim import OptimConfig, build_optimizer, build_scheduler, optimizer_step

    init_distributed("cpu")
    par = ParallelConfig(**parallel)
    initialize_model_parallel(par)
    set_seed(0)
    recipe = make_recipe(load_hf_config(hf_dir), par, dtype="float32", backend="local")
    model = wrap_ddp(build_av(recipe, hf_dir=hf_dir), distributed_optimizer=True)
    MODEL[:] = [model]
    cfg = OptimConfig(lr=1e-3, warmup_steps=0, decay="constant", clip_grad=0.0)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=2)
    engine = NativeEngine(model, vocab_size=recipe.hf.vocab_size)

    vectors = torch.randn(2, recipe.hf.hidden_size, generator=torch.Generator().manual_seed(0)) * 5
    tokens, meta, _ = prompts(Path(hf_dir), vectors)
    virtual, table = inject(
        tokens,
        vectors,
        tokens=meta,
        vocab_size=recipe.hf.vocab_size,
        injection_scale=INJECTION_SCALE,
    )
    params = SamplingParams(max_new_tokens=6, temperature=0.8, n=3, seed=3)
    out = engine.generate(virtual, table, params)
    rewards = -(out.tokens_NT.float().mean(dim=1) % 7)  # any fixed function of the samples
    advantages = grpo.group_advantages(rewards, params.n)
    old = out.logprobs_NT
    ref = old - 0.1 * torch.arange(old.shape[1])[None, :]  # a reference that differs
    microbatches = []
    for rows in (slice(0, 3), slice(3, 6)):
        mb = rollout_microbatch(virtual, table, out, params.n, rows=rows)
        mb.update(old_logprobs=old[rows], ref_logprobs=ref[rows], advantages=advantages[rows])
        microbatches.append(mb)
    step = partial(
        grpo_forward_step, temperature=params.temperature, clip=0.2, kl_coef=0.05, kl_kind=kl_kind
    )
    optimizer.zero_grad()
    loss = forward_backward(
        model, step, microbatches, seq_length=microbatches[0]["tokens"].shape[1], loss_key=LOSS_KEY
    )
    teacher = teacher_forced_logprobs(model, virtual, table, out, params, recipe.hf.vocab_size)
    expected = None
    if teacher is not None:
        mask = torch.arange(old.shape[1])[None, :] < out.lengths_N[:, None]
        policy, _ = grpo.policy_loss(teacher, old, advantages, mask)
        expected = float(policy + 0.05 * grpo.kl_penalty(teacher, ref, mask, kl_kind))
    update = optimizer_step(
        optimizer, scheduler, loss=loss.loss, explain_failure=lambda v, n: f"non-finite {v} {n}"
    )
    after = engine.generate(virtual, table, params)
    return dict(
        loss=loss.loss,
        expected=expected,
        grad_norm=update.grad_norm,
        samples_changed=not torch.equal(after.logprobs_NT, out.logprobs_NT),
    )


def grpo_learning_rank(av_ckpt: str, ar_ckpt: str, vectors, steps: int, settings: dict) -> list:
    """`steps` GRPO updates of an SFT'd toy AV/AR pair on `vectors` (B at a time); metrics."""
    from transformers import AutoTokenizer

    from nla_mcore import prompts as nla_prompts
    from nla_mcore.data.sft_tokenize import prompt_and_end_of_turn
    from nla_mcore.models.build import make_recipe
    from nla_mcore.models.hf_config import load_hf_config
    from nla_mcore.models.nla import ar_recipe, build_ar, build_av
    from nla_mcore.rl.reference import ReferencePolicy
    from nla_mcore.rl.rollout import NativeEngine
    from nla_mcore.rl.step import GRPOSettings, NLAPair, grpo_step
    from nla_mcore.runtime.distributed import init_distributed, set_seed
    from nla_mcore.runtime.parallel import ParallelConfig, initialize_model_parallel
    from nla_mcore.sidecar import read_model_sidecar
    from nla_mcore.train.checkpointing import TrainedModel
    from nla_mcore.train.engine import wrap_ddp
    from nla_mcore.train.optim import OptimConfig, build_optimizer, build_scheduler

    init_distributed("cpu")
    par = ParallelConfig()
    initialize_model_parallel(par)
    set_seed(0)
    hf_dir = f"{av_ckpt}/hf"
    recipe = make_recipe(load_hf_config(hf_dir), par, dtype="float32", backend="local")
    sidecar = read_model_sidecar(Path(av_ckpt).parent.parent.parent / "hf")
    ar_sidecar = read_model_sidecar(Path(ar_ckpt).parent.parent.parent / "hf")

    def trained(name, model, lr):
        model = wrap_ddp(model, distributed_optimizer=True)
        cfg = OptimConfig(lr=lr, min_lr=min(lr, 2e-6), warmup_steps=0, decay="constant")
        opt = build_optimizer(model, cfg)
        return TrainedModel(
            name=name,
            model=model,
            optimizer=opt,
            scheduler=build_scheduler(opt, cfg, steps),
            recipe=recipe,
            sidecar=None,
            hf_dir=Path(hf_dir),
        )

    av = trained("av", build_av(recipe, ckpt_dir=av_ckpt), settings.pop("av_lr"))
    k = ar_sidecar.extraction_layer_index
    ar = trained("ar", build_ar(ar_recipe(recipe, k), ckpt_dir=ar_ckpt), settings.pop("ar_lr"))
    tok = AutoTokenizer.from_pretrained(hf_dir)
    chat = nla_prompts.av_messages(sidecar.tokens.injection_char, sidecar.prompt_templates.av)
    prompt_ids, end_of_turn = prompt_and_end_of_turn(tok, chat, "toy")
    pair = NLAPair(
        av=av,
        ar=ar,
        engine=NativeEngine(av.model, vocab_size=recipe.hf.vocab_size),
        reference=ReferencePolicy(av.model),
        tokenizer=tok,
        prompt_ids=prompt_ids,
        tokens=sidecar.tokens,
        injection_scale=sidecar.extraction.injection_scale,
        ar_template=ar_sidecar.prompt_templates.ar,
        mse_scale=ar_sidecar.extraction.mse_scale,
        stop_ids=tuple(end_of_turn[-1:]),
        vocab_size=recipe.hf.vocab_size,
    )
    cfg = GRPOSettings(**settings)
    batch = 4  # vectors per step
    out = []
    for step in range(1, steps + 1):
        start = ((step - 1) * batch) % len(vectors)
        out.append(grpo_step(pair, vectors[start : start + batch], step, cfg))
    return out
