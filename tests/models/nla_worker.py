"""Reference inputs/outputs and rank programs for the AV/AR parity tests.

References come from transformers: the AV's logits with the injected vector spliced into
`inputs_embeds` at the marker (after the embedding and its Gemma sqrt(d) scale), and the AR's
un-normalised output of decoder block K (a forward hook; the released AR has no final norm) at
each sample's last non-pad token, through the identity head.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

INJECTION_SCALE = 40.0
EXTRACTION_LAYER = 2  # K: the AR keeps decoder blocks 0..K (3 of the toy models' 4)


def pad_to(ids: list[int], length: int, pad_id: int) -> list[int]:
    return ids + [pad_id] * (length - len(ids))


def av_inputs(hf_dir: Path, *, batch: int = 2, multiple: int = 8, seed: int = 0):
    """(tokens [B, S] with the marker, vectors [B, D], Tokens, marker position)."""
    import transformers

    from nla_mcore.prompts import build_av_prompt, select_marker
    from nla_mcore.sidecar import make_tokens

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    prompt = build_av_prompt(tok, select_marker(tok))
    length = -(-len(prompt.ids) // multiple) * multiple
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tokens = torch.tensor([pad_to(list(prompt.ids), length, pad_id)] * batch)
    d = transformers.AutoConfig.from_pretrained(hf_dir).hidden_size
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(batch, d, generator=gen) * torch.tensor([3.0, 70000.0][:batch]).unsqueeze(
        1
    )
    return tokens, vectors, make_tokens(tok), prompt.marker_pos


def hf_av_logits(hf_dir, tokens, vectors, marker_pos, *, scale_injected_by: float = 1.0):
    """transformers logits with normalize(v, INJECTION_SCALE) spliced in at the marker."""
    import transformers

    from nla_mcore.prompts import normalize

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(tokens).clone()
        embeds[:, marker_pos] = normalize(vectors, INJECTION_SCALE) * scale_injected_by
        return model(inputs_embeds=embeds).logits.float()


def ar_inputs(hf_dir: Path, multiple: int = 8):
    """(tokens [B, S] right-padded, readout index [B]) for AR prompts of different lengths."""
    import transformers

    from nla_mcore.prompts import ar_prompt_ids

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    texts = [
        "The cat sat on the mat.",
        "A list of three items.",
        "Formal tone; a definition follows here, with care.",
    ]
    rows = [ar_prompt_ids(tok, t) for t in texts]
    length = -(-max(map(len, rows)) // multiple) * multiple
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tokens = torch.tensor([pad_to(r, length, pad_id) for r in rows])
    return tokens, torch.tensor([len(r) - 1 for r in rows])


def hf_ar_outputs(hf_dir, tokens, index, *, head: torch.Tensor | None = None) -> torch.Tensor:
    """Block K's output at `index` (transformers, hook: no final norm) through `head` (identity)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    captured = {}
    layer = model.model.layers[EXTRACTION_LAYER]
    handle = layer.register_forward_hook(
        lambda m, i, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        model(tokens)
    handle.remove()
    h = captured["h"][torch.arange(tokens.shape[0]), index]
    return h if head is None else h @ head.T


def nla_rank(
    kind: str,
    source: dict,
    parallel: dict,
    inputs_path: str,
    out_path: str,
    device: str = "cpu",
    dtype: str = "float32",
):
    """Build the AV or AR at `parallel` from `source` (hf_dir= or ckpt_dir=), run the inputs,
    save the full output (AV logits [B, S, V]; AR predictions [B, D]) from one rank."""
    from functools import partial

    from megatron.core import parallel_state as ps

    from nla_mcore.models.attention import gather_cp_sequence
    from nla_mcore.models.build import make_recipe
    from nla_mcore.models.hf_config import load_hf_config
    from nla_mcore.models.nla import ar_recipe, build_ar, build_av
    from nla_mcore.runtime.distributed import init_distributed, set_seed
    from nla_mcore.runtime.parallel import ParallelConfig, initialize_model_parallel
    from nla_mcore.train.engine import forward_collect
    from nla_mcore.train.lm import lm_microbatch, logits_forward_step
    from nla_mcore.train.nla_steps import ar_forward_step

    _, dev = init_distributed(device)
    par = ParallelConfig(**parallel)
    initialize_model_parallel(par)
    set_seed(0)
    hf_dir = source.get("hf_dir") or str(Path(source["ckpt_dir"]) / "hf")
    recipe = make_recipe(load_hf_config(hf_dir), par, dtype=dtype, backend="local")
    inputs = {k: v.to(dev) for k, v in load_file(inputs_path).items()}
    batch = {k: v for k, v in lm_microbatch(inputs["tokens"]).items()}
    if kind == "av":
        model = build_av(recipe, **source)
        batch["injection"] = inputs["injection"]
        step = logits_forward_step
    else:
        model = build_ar(ar_recipe(recipe, EXTRACTION_LAYER), **source)
        batch["readout_index"] = inputs["readout_index"]
        step = partial(ar_forward_step)
    model.eval()
    with torch.no_grad():
        out = forward_collect(model, step, [batch], seq_length=inputs["tokens"].shape[1])
    if not ps.is_pipeline_last_stage():
        return
    cp_group = ps.get_context_parallel_group()
    if kind == "av":
        full = gather_cp_sequence(out[0], seq_dim=1, cp_group=cp_group)
    else:
        pred, owned = out[0]
        full = pred.float() * owned[:, None]
        if cp_group.size() > 1:
            torch.distributed.all_reduce(full, group=cp_group)  # each sample owned by one CP rank
    if ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0:
        save_file({"out": full.float().cpu().contiguous()}, out_path)


def nla_jobs(jobs: list[tuple]) -> None:
    for job in jobs:
        nla_rank(*job)


def save_rank(kind: str, hf_dir: str, parallel: dict, out_dir: str, head_seed: int | None = None):
    """Build the AV or AR from the HF base at `parallel` and save it as an NLA checkpoint.
    For the AR, `head_seed` perturbs the identity head so its export is observable."""
    import transformers

    from nla_mcore.converters.nla_export import make_model_sidecar, save_nla_checkpoint
    from nla_mcore.models.build import make_recipe
    from nla_mcore.models.hf_config import load_hf_config
    from nla_mcore.models.nla import ar_recipe, build_ar, build_av
    from nla_mcore.runtime.distributed import init_distributed, set_seed
    from nla_mcore.runtime.parallel import ParallelConfig, initialize_model_parallel

    init_distributed("cpu")
    par = ParallelConfig(**parallel)
    initialize_model_parallel(par)
    set_seed(0)
    base = make_recipe(load_hf_config(hf_dir), par, dtype="float32", backend="local")
    recipe = base if kind == "av" else ar_recipe(base, EXTRACTION_LAYER)
    model = (build_av if kind == "av" else build_ar)(recipe, hf_dir=hf_dir)
    if kind == "ar" and model.value_head is not None and head_seed is not None:
        d = model.config.hidden_size
        delta = torch.randn(d, d, generator=torch.Generator().manual_seed(head_seed)) * 0.05
        with torch.no_grad():
            model.value_head.weight.add_(delta)
    sidecar = make_model_sidecar(
        kind,
        transformers.AutoTokenizer.from_pretrained(hf_dir),
        d_model=base.hf.hidden_size,
        extraction_layer=EXTRACTION_LAYER,
        injection_scale=INJECTION_SCALE if kind == "av" else None,
        mse_scale=float(base.hf.hidden_size) ** 0.5,
        base_checkpoint=hf_dir,
    )
    save_nla_checkpoint(model, out_dir, recipe=recipe, sidecar=sidecar, hf_dir=hf_dir)


def bad_sample_rank(hf_dir: str, parallel: dict) -> dict:
    """Build the AV at `parallel`, then try to run a batch whose second sample has two markers.
    Returns this rank's error and how long after the batch it came (no hang on any stage)."""
    import time

    from nla_mcore.models.build import make_recipe
    from nla_mcore.models.hf_config import load_hf_config
    from nla_mcore.models.injection import InjectionError, inject
    from nla_mcore.models.nla import build_av
    from nla_mcore.runtime.distributed import init_distributed, set_seed
    from nla_mcore.runtime.parallel import ParallelConfig, initialize_model_parallel
    from nla_mcore.train.engine import forward_collect
    from nla_mcore.train.lm import lm_microbatch, logits_forward_step

    init_distributed("cpu")
    par = ParallelConfig(**parallel)
    initialize_model_parallel(par)
    set_seed(0)
    model = build_av(make_recipe(load_hf_config(hf_dir), par, backend="local"), hf_dir=hf_dir)
    tokens, vectors, marker, pos = av_inputs(Path(hf_dir))
    tokens[1, pos + 3] = marker.injection_token_id  # a second marker in sample 1
    start = time.monotonic()
    try:
        virtual, table = inject(
            tokens,
            vectors,
            tokens=marker,
            vocab_size=model.vocab_size,
            injection_scale=INJECTION_SCALE,
        )
        batch = {**lm_microbatch(virtual), "injection": table}
        forward_collect(model, logits_forward_step, [batch], seq_length=tokens.shape[1])
    except InjectionError as err:
        return {"error": str(err), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}
