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
        if run.get("recompute"):  # every stage takes part; the last one has the result
            recomputed = teacher_forced_logprobs(
                model, virtual_BS, table_BD, out, run["params"], recipe.hf.vocab_size
            )
            if ps.is_pipeline_last_stage():
                result["recomputed"] = recomputed
        # numpy, not tensors: a tensor's shared-memory handle can outlive the rank process
        results.append({k: v.numpy() if torch.is_tensor(v) else v for k, v in result.items()})
    return results  # every rank holds the whole rollout (the recompute: the last stage)


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
