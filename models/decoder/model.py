"""The dense decoder on megatron-core: TransformerConfig, layer spec and GPTModel from a `DecoderArch`.

Used (through models/registry.py) by the converters' verifier, the trainer and the benchmarks, so
exactly one place decides how a checkpoint of each family maps onto megatron-core. The layer spec is
Transformer Engine's when the backend is TE (models/backends.py), megatron-core's local (pure torch)
spec otherwise, with a torch RMSNorm that runs under sequence parallelism (`torch_rms_norm`, in the
layers and as the final norm); for packed (THD) batches the local spec's core attention is replaced by
the project's packed attention (models/packed_attention.py). A mixture-of-experts MLP (`arch.moe`) is
megatron-core's MoE layer: its router, its token dispatcher, and the experts as one module per expert on
the local spec (SequentialMLP) or TE's grouped GEMM (TEGroupedMLP), whose checkpoints are interchangeable.

    arch = read_arch("/models/Qwen2.5-32B")
    config = transformer_config(arch, tensor_parallel=8, params_dtype=torch.bfloat16)
    model = build_model(arch, config, layer_spec(arch, choose_backend("cuda"), packed=True))
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from common.megatron_cpu import fill_missing_te_names
from models.backends import Backend

from .arch import DecoderArch

if TYPE_CHECKING:
    import torch


def transformer_config(
    arch: DecoderArch,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    params_dtype: torch.dtype | None = None,
    use_cpu_initialization: bool = False,
    **overrides: Any,
):
    """megatron-core's TransformerConfig for `arch` (weights in `params_dtype`, default fp32). Fusions
    that need apex or TE are off by default; the trainer turns on what its environment supports through
    `overrides` (models/megatron_settings.py)."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    params_dtype = params_dtype or torch.float32

    settings: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=use_cpu_initialization,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        **moe_settings(arch),
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


def moe_settings(arch: DecoderArch) -> dict[str, Any]:
    """The TransformerConfig fields of `arch`'s experts (none for a dense model): dropless top-k routing
    in fp32, the chosen probabilities renormalised where the family does (the softmax of the chosen
    logits is the full softmax renormalised over them), no load-balancing loss unless the trainer sets
    one, one module per expert (`moe_grouped_gemm` comes with TE's layer spec)."""
    moe = arch.moe
    if moe is None:
        return {}
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.experts_per_token,
        moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
        moe_router_pre_softmax=not moe.normalize_top_k,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
    )


def layer_spec(arch: DecoderArch, backend: Backend, *, packed: bool):
    """TE's fused layers, or megatron-core's local (pure torch) ones, with RMSNorm on each query and key
    head where the family has it; with `packed`, the local spec's core attention is the packed (THD)
    attention, which megatron-core's local spec does not have."""
    from megatron.core.models.gpt import gpt_layer_specs

    experts = arch.moe.num_experts if arch.moe else None
    if backend.transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=experts is not None, qk_layernorm=arch.qk_layernorm
        )
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_layernorm, normalization="RMSNorm"
    )
    if experts is not None:
        # TE's MoE layer keeps its own pre-MLP norm (`pre_mlp_layernorm.weight`: no fused linear to hold it);
        # the local spec would store it under the dense MLP's fused name, and the two specs' checkpoints
        # would not load into each other.
        del spec.submodules.sharded_state_dict_keys_map["pre_mlp_layernorm."]
        fill_missing_te_names()  # megatron-core's router refers to a TE name without TE
    _use_torch_rms_norm(spec)
    if packed:
        from models.packed_attention import with_packed_attention

        spec = with_packed_attention(spec)
    return spec


@functools.cache
def torch_rms_norm():
    """RMSNorm in pure torch (the function torch.nn.RMSNorm runs) taking megatron-core's norm arguments,
    which, unlike megatron-core's WrappedTorchNorm, runs under sequence parallelism: each tensor-parallel
    rank normalises its share of the tokens, and the weight is marked `sequence_parallel`, so megatron-core
    sums its gradient over the TP ranks (as it does for TE's norms)."""
    import torch

    class TorchRMSNorm(torch.nn.Module):
        def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_ignored):
            super().__init__()
            self.eps = eps
            self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
            self.weight.sequence_parallel = config.sequence_parallel

        def forward(self, x):
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    return TorchRMSNorm


def _use_torch_rms_norm(spec) -> None:
    from megatron.core.transformer.identity_op import IdentityOp

    norm = torch_rms_norm()
    layer = spec.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = norm
    attention = layer.self_attention.submodules
    for name in ("q_layernorm", "k_layernorm"):  # per head, over the whole sequence: summed over TP by name
        if getattr(attention, name) is not IdentityOp:
            setattr(attention, name, norm)


def _with_final_norm(layer_spec, config, vp_stage):
    """The block of `layer_spec`'s layers ending with the same torch RMSNorm (megatron-core's default final
    norm for a local layer spec is its WrappedTorchNorm)."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * layers, layer_norm=torch_rms_norm())


def build_model(
    arch: DecoderArch, config, spec, *, pre_process: bool = True, post_process: bool = True, vp_stage=None
):
    """A GPTModel (this rank's pipeline stage) for `arch` with megatron-core's RoPE at the config's base
    (and Llama 3.1's scaling where the config has it: its reader has checked that megatron-core's fixed
    frequency factors are the config's)."""
    from megatron.core.models.gpt import GPTModel

    scaling = arch.rope_scaling
    rope_scaling = dict(rope_scaling=True, rope_scaling_factor=scaling.factor) if scaling else {}
    if getattr(spec.submodules, "input_layernorm", None) is torch_rms_norm():
        spec = _with_final_norm(spec, config, vp_stage)

    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_base,  # Megatron-LM's own Qwen2.5 loader forgets this (docs/architecture.md)
        **rope_scaling,
        vp_stage=vp_stage,
    )
