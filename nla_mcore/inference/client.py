"""`NLAClient`: explanations of activation vectors from an exported AV, with transformers only.

Everything comes from the directory's `nla_meta.yaml`: the marker and its neighbours, the AV
template, the injection scale.  The prompt is the template's chat rendered by the tokenizer
with the generation prompt; its embedding is looked up by the model's own input embedding
(which multiplies by sqrt(d) for Gemma), and the marker's row is replaced by the vector
rescaled to `injection_scale` (never multiplied by sqrt(d)); `generate` runs on
`inputs_embeds` and stops at the template's end of turn.  Every vector of a batch shares the
same prompt ids, so no padding is needed.  Legend: B batch, S prompt length, D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nla_mcore import prompts
from nla_mcore.inference.model_dirs import (
    NLAModelError,
    check_bos,
    check_embedding_scale,
    open_model_dir,
    quiet_transformers,
    resolve_device_dtype,
)
from nla_mcore.sidecar import check_marker


@dataclass(frozen=True)
class Explanation:
    """What the AV wrote for one vector."""

    text: str | None
    """The parsed `<explanation>` text; None when it cannot be parsed."""
    response: str
    """Everything the AV generated, decoded (without the end of turn)."""
    token_ids: tuple[int, ...]
    """The generated ids, up to and including the end of turn when there is one."""
    num_tokens: int
    """Tokens before the end of turn."""
    finished: bool
    """False when generation hit `max_new_tokens` before the end of turn."""


class NLAClient:
    """Explains vectors with the AV in `av_dir` (ours or the released layout)."""

    def __init__(self, av_dir, *, device: str = "auto", dtype: str = "auto"):
        from transformers import AutoModelForCausalLM

        from nla_mcore.data.sft_tokenize import prompt_and_end_of_turn

        self.dir = open_model_dir(av_dir, "av")
        sidecar, tokenizer = self.dir.sidecar, self.dir.tokenizer
        if sidecar.extraction.injection_scale is None:
            raise NLAModelError(f"{av_dir}: nla_meta.yaml has no extraction.injection_scale")
        self.injection_scale = float(sidecar.extraction.injection_scale)
        canonical = check_marker(sidecar, tokenizer)  # marker, neighbours, template drift
        chat = prompts.av_messages(sidecar.tokens.injection_char, sidecar.prompt_templates.av)
        prompt_ids, end_of_turn = prompt_and_end_of_turn(tokenizer, chat, str(av_dir))
        if tuple(prompt_ids) != canonical.ids:  # one rendering for the check and the prompt
            raise NLAModelError(f"{av_dir}: the AV prompt renders differently on a second call")
        check_bos(prompt_ids, tokenizer, "AV prompt", required=False)
        self.prompt_ids, self.marker_pos = prompt_ids, canonical.marker_pos
        self.stop_ids = sorted(set(end_of_turn[-1:]) | {tokenizer.eos_token_id} - {None})
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        with quiet_transformers():
            self.model = AutoModelForCausalLM.from_pretrained(av_dir, dtype=self.dtype)
        self.model.to(self.device).eval()
        check_embedding_scale(self.model, self.dir, prompt_ids[self.marker_pos - 1])

    @property
    def tokenizer(self):
        return self.dir.tokenizer

    def prompt_embeddings(self, vectors_BD: torch.Tensor) -> torch.Tensor:
        """[B, S, D]: the prompt's embeddings with each vector at the marker."""
        ids = torch.tensor([self.prompt_ids], device=self.device).expand(len(vectors_BD), -1)
        with torch.no_grad():
            embeds_BSD = self.model.get_input_embeddings()(ids).clone()
        injected_BD = prompts.normalize(vectors_BD.float(), self.injection_scale)
        embeds_BSD[:, self.marker_pos] = injected_BD.to(device=self.device, dtype=self.dtype)
        return embeds_BSD

    def explain(
        self,
        vectors_ND,
        *,
        max_new_tokens: int = 150,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int = 16,
        on_batch=None,
    ) -> list[Explanation]:
        """One explanation per vector: greedy when `temperature` is 0, else sampled."""
        vectors_ND = torch.as_tensor(np.asarray(vectors_ND, dtype=np.float32))
        if vectors_ND.dim() != 2 or vectors_ND.shape[1] != self.dir.hf.hidden_size:
            raise ValueError(
                f"vectors of shape {tuple(vectors_ND.shape)}: need [N, {self.dir.hf.hidden_size}]"
            )
        if seed is not None:
            torch.manual_seed(seed)
        out: list[Explanation] = []
        for start in range(0, len(vectors_ND), batch_size):
            batch_BD = vectors_ND[start : start + batch_size]
            out.extend(self._generate(batch_BD, max_new_tokens, temperature, top_p))
            if on_batch is not None:
                on_batch(len(batch_BD))
        return out

    def _generate(self, vectors_BD, max_new_tokens, temperature, top_p) -> list[Explanation]:
        embeds_BSD = self.prompt_embeddings(vectors_BD)
        mask_BS = torch.ones(embeds_BSD.shape[:2], dtype=torch.long, device=self.device)
        sampling = (
            dict(do_sample=True, temperature=temperature, top_p=top_p)
            if temperature > 0
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        )
        pad = self.tokenizer.pad_token_id
        with torch.no_grad():
            new_BT = self.model.generate(
                inputs_embeds=embeds_BSD,
                attention_mask=mask_BS,
                max_new_tokens=max_new_tokens,
                eos_token_id=self.stop_ids,
                pad_token_id=self.stop_ids[0] if pad is None else pad,
                **sampling,
            )
        return [self._decode(row) for row in new_BT.tolist()]

    def _decode(self, ids: list[int]) -> Explanation:
        stops = [i for i, t in enumerate(ids) if t in self.stop_ids]
        finished = bool(stops)
        kept = ids[: stops[0]] if stops else ids
        response = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Explanation(
            text=prompts.parse_explanation(response) if finished else None,
            response=response,
            token_ids=tuple(ids[: stops[0] + 1] if stops else ids),
            num_tokens=len(kept),
            finished=finished,
        )
