"""AV and AR directories in the original project's released layout, built from NLA.md's
description with transformers and hand-written YAML (never through our exporter or sidecar
writer), so the inference tests load what a user downloads rather than what we write.

* AV: the full fine-tuned model (`config.json`, `model*.safetensors`), tokenizer files and
  `nla_meta.yaml`.
* AR: `config.json` with `num_hidden_layers = K+1`, the truncated *base* model (no LM head;
  keys without the `model.` prefix) in sharded `model-*.safetensors`, `value_head.safetensors`
  (a `Linear` state dict, key `weight`), tokenizer files and `nla_meta.yaml`.
* Sidecars in schema v1 (`role: actor|critic`, templates `actor`/`critic`, the AR's depth as
  `critic.num_hidden_layers`, a numeric `mse_scale`) or v2 (`role: av|ar`, `av`/`ar`,
  `critic.extraction_layer_index`, `mse_scale: sqrt_d_model`).

The marker is found as NLA.md says (the first code point of U+3200-U+33FF that encodes to one
non-UNK token) and its neighbours are read off the canonical prompt rendered here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from nla_mcore.prompts import AR_PROMPT_TEMPLATE, AV_PROMPT_TEMPLATE
from tests.converters.convert_worker import make_hf_model

K = 2  # the toy models have 4 decoder layers; the AR keeps blocks 0..K
INJECTION_SCALE = 40.0
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def find_marker(tokenizer) -> tuple[str, int]:
    for code_point in range(0x3200, 0x3400):
        ids = tokenizer.encode(chr(code_point), add_special_tokens=False)
        if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
            return chr(code_point), ids[0]
    raise AssertionError("the toy tokenizer has no marker")


def marker_tokens(tokenizer, template: str = AV_PROMPT_TEMPLATE) -> dict:
    char, token_id = find_marker(tokenizer)
    chat = [{"role": "user", "content": template.replace("{injection_char}", char)}]
    ids = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    pos = ids.index(token_id)
    return dict(
        injection_char=char,
        injection_token_id=token_id,
        injection_left_neighbor_id=ids[pos - 1],
        injection_right_neighbor_id=ids[pos + 1],
    )


def sidecar(role: str, schema: str, d: int, tokens: dict, *, depth: int = K + 1) -> dict:
    """The YAML mapping of an AV ('av') or AR ('ar') sidecar in schema 'v1' or 'v2'."""
    v1 = schema == "v1"
    names = {"av": "actor", "ar": "critic"} if v1 else {"av": "av", "ar": "ar"}
    data = dict(
        kind="nla_model",
        role=names[role],
        stage="rl",
        d_model=d,
        base_checkpoint="toy/base",
        extraction=dict(
            injection_scale=INJECTION_SCALE if role == "av" else None,
            mse_scale=float(d**0.5) if v1 else "sqrt_d_model",
        ),
        tokens=tokens,
        prompt_templates={names["av"]: AV_PROMPT_TEMPLATE, names["ar"]: AR_PROMPT_TEMPLATE},
        trained_on=["data/rl_train.parquet"],
        training=dict(step=1, lr=1e-5, global_batch_size=512),
        created_at="2026-03-16T09:41:27+00:00",
        created_by="nla.train_actor.NLAFSDPActor",
    )
    if role == "ar":
        data["critic"] = (
            dict(num_hidden_layers=depth, value_head="value_head.safetensors")
            if v1
            else dict(extraction_layer_index=depth - 1)
        )
    if not v1:
        data["schema_version"] = 2
    return data


def write_yaml(directory: Path, data: dict) -> None:
    (directory / "nla_meta.yaml").write_text(
        yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    )


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


def released_pair(
    root: Path, family: str, schema: str, *, ar_layers: int = K + 1, head: str = "trained"
) -> dict[str, Path]:
    """{'base', 'av', 'ar'} directories for a random tiny `family` model.

    `ar_layers` is the depth the AR is truncated to (its sidecar always says K); `head`:
    'trained' (the identity plus a little noise, as after training) or 'random'."""
    import transformers

    base = make_hf_model(family, root / "base")
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    d = transformers.AutoConfig.from_pretrained(base).hidden_size
    tokens = marker_tokens(tokenizer)

    av = root / "av"
    av.mkdir(parents=True)
    for f in base.iterdir():
        shutil.copy(f, av / f.name)
    write_yaml(av, sidecar("av", schema, d, tokens))

    ar = root / "ar"
    full = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    backbone = full.model
    backbone.layers = backbone.layers[:ar_layers]
    backbone.config.num_hidden_layers = ar_layers
    if hasattr(backbone.config, "layer_types") and backbone.config.layer_types:
        backbone.config.layer_types = backbone.config.layer_types[:ar_layers]
    backbone.save_pretrained(ar, safe_serialization=True, max_shard_size="100KB")
    copy_tokenizer(base, ar)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(d, d, generator=gen)
    weight = torch.eye(d) + 0.01 * noise if head == "trained" else 0.02 * noise
    save_file({"weight": weight.contiguous()}, str(ar / "value_head.safetensors"))
    write_yaml(ar, sidecar("ar", schema, d, tokens, depth=K + 1))
    return {"base": base, "av": av, "ar": ar}


def edit_sidecar(directory: Path, edit) -> None:
    """Apply `edit(mapping)` to the directory's nla_meta.yaml."""
    path = directory / "nla_meta.yaml"
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
