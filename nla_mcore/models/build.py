"""HF config -> Megatron-Core `TransformerConfig` + layer spec -> `NLAGPTModel` for this rank.

`build_model` is the one place a model is constructed: it reads the family's switches
(`families/`), the parallel layout (`runtime.parallel`) and the pipeline stage of this rank, and
returns the stage's module.  `num_layers` lets callers build a truncated stack (the AR keeps the
first K+1 layers; datagen stops at layer K).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from nla_mcore.models.families.base import Family
from nla_mcore.models.gpt import NLAGPTModel
from nla_mcore.models.hf_config import HFModelConfig, rope_inv_freq
from nla_mcore.models.registry import family_for
from nla_mcore.models.specs import block_spec, resolve_backend
from nla_mcore.runtime.parallel import ParallelConfig, uneven_pipeline_split

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": partial(F.gelu, approximate="tanh")}


@dataclass(frozen=True)
class ModelRecipe:
    """Everything needed to build the model on any rank: the HF facts and how to lay them out."""

    hf: HFModelConfig
    family: Family
    parallel: ParallelConfig
    dtype: torch.dtype = torch.float32
    backend: str = "local"
    num_layers: int | None = None
    """Build only the first `num_layers` decoder layers (None: all)."""

    @property
    def depth(self) -> int:
        return self.num_layers if self.num_layers is not None else self.hf.num_layers


def make_recipe(
    hf: HFModelConfig,
    parallel: ParallelConfig,
    *,
    dtype: str | torch.dtype = "float32",
    backend: str = "auto",
    num_layers: int | None = None,
) -> ModelRecipe:
    """Resolve the family, backend and dtype for `hf` (all checks happen here)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got '{dtype}'")
        dtype = DTYPES[dtype]
    if num_layers is not None and not 1 <= num_layers <= hf.num_layers:
        raise ValueError(f"num_layers={num_layers} must be in [1, {hf.num_layers}]")
    return ModelRecipe(
        hf=hf,
        family=family_for(hf),
        parallel=parallel,
        dtype=dtype,
        backend=resolve_backend(backend),
        num_layers=num_layers,
    )


def transformer_config(
    recipe: ModelRecipe, *, use_cpu_initialization: bool, perform_initialization: bool = True
) -> TransformerConfig:
    """The Megatron-Core `TransformerConfig` for `recipe`."""
    hf, fam, par = recipe.hf, recipe.family, recipe.parallel
    window = {}
    if hf.sliding_window is not None:
        window = dict(
            window_size=(hf.sliding_window - 1, 0),
            window_attn_skip_freq=[int(s) for s in hf.is_sliding[: recipe.depth]],
        )
    # Megatron-Core's torch.compile'd swiglu and bias-dropout-add: pure PyTorch, worth it on
    # GPUs; off on the CPU, where compiling costs more than it saves in tests.
    fuse = torch.cuda.is_available()
    softmax_scale = None
    if fam.softmax_scale_from_query_pre_attn_scalar and hf.query_pre_attn_scalar:
        softmax_scale = hf.query_pre_attn_scalar**-0.5
    return TransformerConfig(
        num_layers=recipe.depth,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        kv_channels=hf.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf.rms_norm_eps,
        layernorm_zero_centered_gamma=fam.zero_centered_norms,
        qk_layernorm=fam.qk_norm,
        gated_linear_unit=True,
        activation_func=ACTIVATIONS[fam.activation],
        add_bias_linear=False,
        add_qkv_bias=fam.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        softmax_scale=softmax_scale,
        init_method_std=hf.initializer_range,
        params_dtype=recipe.dtype,
        bf16=recipe.dtype == torch.bfloat16,
        fp16=recipe.dtype == torch.float16,
        pipeline_dtype=recipe.dtype,
        tensor_model_parallel_size=par.tensor_parallel,
        pipeline_model_parallel_size=par.pipeline_parallel,
        context_parallel_size=par.context_parallel,
        sequence_parallel=par.sequence_parallel,
        calculate_per_token_loss=True,
        bias_activation_fusion=fuse and fam.activation == "silu",
        bias_dropout_fusion=fuse,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
        **window,
        **uneven_pipeline_split(recipe.depth, par.pipeline_parallel),
    )


def build_model(
    recipe: ModelRecipe,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    use_cpu_initialization: bool | None = None,
    perform_initialization: bool = True,
    backbone_only: bool = False,
) -> NLAGPTModel:
    """This rank's pipeline stage of the model (parallel groups must exist), on its device.

    `perform_initialization=False` skips random init (weights are about to be loaded).
    `backbone_only=True` drops the final norm and the LM head on the last stage (the AR, and
    activation extraction): the stage returns the last decoder layer's output."""
    from megatron.core import parallel_state

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage() and not backbone_only
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    hf, fam = recipe.hf, recipe.family
    config = transformer_config(
        recipe,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
    )
    spec = block_spec(
        config,
        recipe.backend,
        qk_norm=fam.qk_norm,
        post_norms=fam.post_norms,
        local_rope=hf.local_rope if fam.dual_rope else None,
    )
    model = NLAGPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=hf.vocab_size,
        max_sequence_length=hf.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=hf.tie_word_embeddings and not backbone_only,
        position_embedding_type="rope",
        rotary_base=int(hf.rope.theta),
        embedding_scale=math.sqrt(hf.hidden_size) if fam.scale_embeddings else None,
        rope_inv_freq=rope_inv_freq(hf.rope, hf.head_dim),
    )
    if not perform_initialization:
        mark_tensor_parallel_weights(model)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Set Megatron-Core's `tensor_model_parallel` / `partition_dim` / `partition_stride` on the
    split weights of a model built with `perform_initialization=False`.

    Megatron-Core 0.16.1 sets them only inside its weight initialisers, so a model built to be
    loaded has split weights that look replicated: the optimizer's gradient norm then counts
    them on TP rank 0 only (a wrong norm and a wrong clip under TP).  `sharding.partition_dim`
    knows the split of every parameter; the gated fc1 has stride 2 ([gate; up] per rank), as
    Megatron-Core's MLP sets it."""
    from nla_mcore.models.sharding import is_gated_fc1, partition_dim

    for name, param in model.named_parameters():
        dim = partition_dim(model, name)
        if dim is None or getattr(param, "tensor_model_parallel", False):
            continue
        param.tensor_model_parallel = True
        param.partition_dim = dim
        param.partition_stride = 2 if is_gated_fc1(name) and dim == 0 else 1
