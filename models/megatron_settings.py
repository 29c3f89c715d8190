"""TransformerConfig settings that are the same for every model family: which fused kernels run
(by backend) and what is recomputed. Each family's `transformer_config(arch, **overrides)` takes them as
overrides.
"""

from __future__ import annotations

from typing import Any

from models.backends import Backend


def kernel_settings(backend: Backend, arch: Any = None) -> dict[str, Any]:
    """The fused kernels Megatron-LM turns on with Transformer Engine, for `transformer_config(**...)`:
    RoPE (the unfused THD path syncs with the host and loops over conversations in every layer), SwiGLU
    (the unfused one keeps another FFN-wide tensor per token and layer), the weight-gradient
    accumulation into the fp32 main gradients, and TE's cross-entropy (otherwise an fp32 copy of the
    [tokens, vocabulary / TP] logits per micro-batch in flight); for a mixture of experts (`arch.moe`),
    the experts as TE's grouped GEMM, which TE's layer spec builds. Without TE: none (torch's paths)."""
    if not backend.transformer_engine:
        return {}
    experts = dict(moe_grouped_gemm=True) if getattr(arch, "moe", None) else {}
    return dict(
        apply_rope_fusion=True,
        bias_activation_fusion=True,
        gradient_accumulation_fusion=True,
        cross_entropy_loss_fusion=True,
        cross_entropy_fusion_impl="te",
        **experts,
    )


def recompute_settings(recompute: str, modules: list[str] | None = None) -> dict[str, Any]:
    """Activation recomputation for `transformer_config(**...)`: none; selective (megatron-core's
    module-level recomputation of `modules`: core_attn by default, which saves nothing with TE's fused
    attention; mlp, layernorm); or full (every layer's input kept, the layer re-run in the backward)."""
    if recompute == "none":
        return {}
    if recompute == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return dict(recompute_granularity="selective", recompute_modules=list(modules or ["core_attn"]))


def expert_settings(
    arch: Any, expert: int, expert_tensor: int, dispatcher: str, aux_loss_coef: float = 0.0
) -> dict[str, Any]:
    """How a mixture of experts (`arch.moe`) is laid out and dispatched, for `transformer_config(**...)`:
    expert and expert-tensor parallel sizes, megatron-core's token dispatcher, its load-balancing loss
    where `aux_loss_coef` (nothing for a dense model)."""
    if getattr(arch, "moe", None) is None:
        return {}
    balancing = (
        dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=aux_loss_coef)
        if aux_loss_coef
        else {}
    )
    return dict(
        expert_model_parallel_size=expert,
        expert_tensor_parallel_size=expert_tensor,
        moe_token_dispatcher_type=dispatcher,
        **balancing,
    )
