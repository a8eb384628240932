"""The supported model families, looked up by name or by an HF config's `model_type`."""

from __future__ import annotations

from nla_mcore.models.families.base import Family
from nla_mcore.models.families.gemma3 import GEMMA3
from nla_mcore.models.families.llama import LLAMA
from nla_mcore.models.families.qwen2 import QWEN2
from nla_mcore.models.hf_config import HFModelConfig

FAMILIES: dict[str, Family] = {f.name: f for f in (QWEN2, LLAMA, GEMMA3)}


def get_family(name: str) -> Family:
    """The family called `name` ('qwen2', 'llama', 'gemma3')."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family '{name}'; known: {sorted(FAMILIES)}") from None


def family_for(hf: HFModelConfig) -> Family:
    """The family whose HF `model_type` matches `hf`, checked against its constraints."""
    for family in FAMILIES.values():
        if hf.model_type in family.hf_model_types:
            family.check(hf)
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
    raise KeyError(f"HF model_type '{hf.model_type}' is not supported; supported: {known}")
