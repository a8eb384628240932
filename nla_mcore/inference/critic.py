"""`NLACritic`: reconstruct vectors from explanations with an exported AR, and score them.

The AR directory holds the base model's first K+1 decoder layers (`config.json` with
`num_hidden_layers = K+1`) and `value_head.safetensors` (a `Linear(d, d)` state dict).  The
prompt is the sidecar's AR template around the explanation, tokenised as a plain string with
special tokens (a BOS for Llama/Gemma); the prediction is the head applied to block K's output
(no final norm) at each sample's last token, with right padding.  Scores: `eval.scores`.
Legend: B batch, S sequence, D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nla_mcore import prompts
from nla_mcore.eval.scores import cosine, fve, mse_nrm
from nla_mcore.inference.model_dirs import (
    NLAModelError,
    check_ar_depth,
    check_bos,
    check_value_head,
    open_model_dir,
    quiet_transformers,
    resolve_device_dtype,
)
from nla_mcore.sidecar import check_ar_suffix

# Weights an exported AR does not have: the backbone's final norm (the AR reads block K's output).
NOT_IN_AN_AR = ("norm.weight", "norm.bias")


@dataclass(frozen=True)
class Scores:
    """How well reconstructions match their vectors, per sample and over the set."""

    cos_N: np.ndarray
    mse_nrm_N: np.ndarray
    fve: float
    baseline: str
    """FVE's baseline (`eval.scores`): rawvar unless asked otherwise."""


class NLACritic:
    """Reconstructs vectors with the AR in `ar_dir` (ours or the released layout)."""

    def __init__(self, ar_dir, *, device: str = "auto", dtype: str = "auto"):
        from safetensors.torch import load_file

        self.dir = open_model_dir(ar_dir, "ar")
        self.extraction_layer = check_ar_depth(self.dir)
        sidecar, tokenizer = self.dir.sidecar, self.dir.tokenizer
        self.template = sidecar.prompt_templates.ar
        check_ar_suffix(sidecar, tokenizer)  # the read-out token is the one training used
        probe = prompts.ar_prompt_ids(tokenizer, "probe", self.template)
        check_bos(probe, tokenizer, "AR prompt", required=self.dir.family.name != "qwen2")
        self.mse_scale = sidecar.extraction.mse_scale
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.backbone = self._load_backbone()
        head_path = self.dir.path / "value_head.safetensors"
        if not head_path.is_file():
            raise NLAModelError(f"{ar_dir}: no value_head.safetensors (the AR's Linear(d, d))")
        weight = load_file(str(head_path))["weight"]
        check_value_head(weight, self.dir)
        self.head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(weight)
        self.head.to(device=self.device, dtype=self.dtype).eval()

    def _load_backbone(self):
        from transformers import AutoModel

        with quiet_transformers():  # it reports the final norm missing; we check ourselves
            model, info = AutoModel.from_pretrained(
                self.dir.path, dtype=self.dtype, output_loading_info=True
            )
        missing = [k for k in info["missing_keys"] if not k.endswith(NOT_IN_AN_AR)]
        if missing:
            raise NLAModelError(f"{self.dir.path}: the AR backbone lacks weights: {missing[:8]}")
        model.norm = torch.nn.Identity()  # read block K's output, as the AR was trained
        return model.to(self.device).eval()

    def reconstruct(self, explanations: list[str], *, batch_size: int = 32) -> np.ndarray:
        """[N, D] float32 predictions, one per explanation."""
        out = []
        for start in range(0, len(explanations), batch_size):
            out.append(self._predict(explanations[start : start + batch_size]))
        return np.concatenate(out) if out else np.zeros((0, self.dir.hf.hidden_size), np.float32)

    def _predict(self, explanations: list[str]) -> np.ndarray:
        rows = [prompts.ar_prompt_ids(self.dir.tokenizer, e, self.template) for e in explanations]
        length = max(map(len, rows))
        ids_BS = torch.zeros((len(rows), length), dtype=torch.long)
        mask_BS = torch.zeros_like(ids_BS)
        for b, row in enumerate(rows):
            ids_BS[b, : len(row)] = torch.tensor(row)
            mask_BS[b, : len(row)] = 1
        last_B = torch.tensor([len(r) - 1 for r in rows])
        with torch.no_grad():
            hidden_BSD = self.backbone(
                input_ids=ids_BS.to(self.device), attention_mask=mask_BS.to(self.device)
            ).last_hidden_state
            h_BD = hidden_BSD[torch.arange(len(rows)), last_B.to(self.device)]
            return self.head(h_BD).float().cpu().numpy()

    def score(
        self, explanations: list[str], vectors_ND, *, baseline: str = "rawvar", batch_size=32
    ) -> Scores:
        """Reconstruct each explanation and compare it with its vector (FVE against `baseline`
        over this set: `eval.scores`; NaN for a single vector)."""
        vectors_ND = np.asarray(vectors_ND, dtype=np.float32)
        if len(explanations) != len(vectors_ND):
            raise ValueError(f"{len(explanations)} explanations for {len(vectors_ND)} vectors")
        pred_ND = self.reconstruct(explanations, batch_size=batch_size)
        mse_N = mse_nrm(pred_ND, vectors_ND, self.mse_scale)
        return Scores(
            cos_N=cosine(pred_ND, vectors_ND),
            mse_nrm_N=mse_N,
            fve=fve(float(mse_N.mean()), vectors_ND, self.mse_scale, baseline),
            baseline=baseline,
        )
