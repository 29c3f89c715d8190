"""Stand-ins for the cluster's fused kernels, and the patches that let megatron-core run on fake tensors.

The dry run measures what a rank keeps in memory, not what it computes, so each stand-in allocates
exactly the outputs and the saved-for-backward tensors of the kernel it replaces, fills them with zeros
(finite, so the gradient norm is finite and the optimizer step runs), and computes nothing else:

| stand-in for | keeps for the backward |
|---|---|
| TE's fused RMSNorm (in LayerNormLinear and TENorm) | its input, an fp32 reciprocal RMS per token |
| TE's flash varlen attention (THD, with CP) | q, k, v, the output, an fp32 logsumexp per head and token |
| TE's fused THD RoPE | nothing (the frequencies only) |
| megatron-core's fused SwiGLU | its input (the fc1 output) |
| TE's parallel cross-entropy | the logits, which it overwrites with their gradient |
| apex's/TE's weight-gradient accumulation | nothing: it adds into the fp32 main gradient in place |
| TE's FusedAdam | two fp32 moments per main parameter (no temporaries) |
| TE's dummy weight gradients | one bf16 buffer per weight shape, kept for the run |
| megatron-core's MoE token dispatcher (balanced routing) | the permutation's row map, int64 per routing |

Everything here is active only inside `dry_run_patches()`; nothing outside the dry run sees it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed  # noqa: F401  (registers the c10d ops)
from torch.utils._python_dispatch import TorchDispatchMode

STANDINS = {
    "rmsnorm": "TE's fused RMSNorm",
    "attention": "TE's flash varlen attention (THD, with context parallelism)",
    "rope": "TE's fused THD RoPE",
    "swiglu": "megatron-core's fused SwiGLU",
    "cross_entropy": "TE's parallel cross-entropy",
    "adam": "TE's FusedAdam",
    "wgrad": "the weight-gradient GEMM accumulating into the fp32 main gradient",
    "dummy_wgrad": "TE's kept placeholder weight gradients",
    "moe_dispatch": "megatron-core's MoE token dispatcher, routing balanced over the experts",
}


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        rstd = torch.zeros(x.shape[:-1], dtype=torch.float32, device=x.device)
        ctx.save_for_backward(x, weight, rstd)
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        x, weight, _ = ctx.saved_tensors
        return torch.zeros_like(x), torch.zeros_like(weight)


class FusedRMSNorm(torch.nn.Module):
    """Takes megatron-core's norm arguments (a layer spec's norm or the final norm); its weight is marked
    `sequence_parallel` as TE's is, so megatron-core all-reduces its gradient over the TP ranks."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_ignored):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x):
        return _RMSNormFunction.apply(x, self.weight)


class _FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.zeros_like(query)
        logsumexp = torch.zeros(query.shape[1], query.shape[0], dtype=torch.float32, device=query.device)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)


class FlashAttention(torch.nn.Module):
    """The `core_attention` of the layer spec: query [T, heads, dim], key/value [T, groups, dim] of this
    rank's tokens; returns [T, heads x dim] as TE's THD attention does."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, *args, **kwargs):
        super().__init__()
        self.config = config

    def forward(self, query, key, value, attention_mask=None, *args, packed_seq_params=None, **kwargs):
        out = _FlashAttentionFunction.apply(query, key, value)
        return out.reshape(out.shape[0], -1)


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return torch.zeros_like(t)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


def _rope_thd(t, cu_seqlens, freqs, *args, **kwargs):
    return _RopeFunction.apply(t)


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels):
        ctx.save_for_backward(logits)  # TE writes the gradient into the logits' memory in the forward
        return torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)

    @staticmethod
    def backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        return logits, None


def _cross_entropy(logits, labels, tp_group=None, is_cg_capturable=False):
    return _CrossEntropyFunction.apply(logits, labels)


def _swiglu(y):
    return torch.zeros(*y.shape[:-1], y.shape[-1] // 2, dtype=y.dtype, device=y.device)


def _swiglu_back(g, y):
    return torch.zeros_like(y)


def _l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron-core's pure-torch l2 norm builds a tensor from a list of tensors, which fake tensors
    cannot; the norm's value does not matter here."""
    return torch.ones(1, dtype=torch.float32), None


class _WeightGradientAccumulation:
    """apex's fused_weight_gradient_mlp_cuda: the weight gradient GEMM accumulates into the fp32 main
    gradient in place (no weight-sized temporary); its value does not matter here."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad):
        pass

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


def _dummy_weight_gradients():
    """TE's get_dummy_wgrad: the placeholder weight gradient a linear layer returns once it has added
    into the main gradient, one kept buffer per shape and dtype (megatron-core allocates a new one per
    call without TE)."""
    kept: dict[tuple, torch.Tensor] = {}

    def get_dummy_wgrad(shape, dtype, zero=False):
        key = (*shape, dtype)
        if key not in kept:
            kept[key] = torch.empty(shape, dtype=dtype)
        if zero:
            kept[key].zero_()
        return kept[key].detach()

    return get_dummy_wgrad


class FusedAdam(torch.optim.AdamW):
    """TE's/apex's FusedAdam updates in place, with no temporaries: here the state it keeps (two fp32
    moments per main parameter and a step count) and nothing else."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1


class _NoFP8:
    """TE's FP8GlobalStateManager, as TE reports it without FP8: megatron-core's norm recomputation
    (CheckpointWithoutOutput) asks it whatever the configuration."""

    @staticmethod
    def is_fp8_enabled() -> bool:
        return False

    @staticmethod
    def get_fp8_recipe():
        return None


def _all_gather_object(object_list, obj, group=None):
    """Every rank holds the same parameter groups (the only caller during construction), so each slot
    gets this rank's object."""
    for i in range(len(object_list)):
        object_list[i] = obj


def _bfloat16(module: torch.nn.Module) -> torch.nn.Module:
    """megatron-core's Float16Module casts the model it wraps with `.bfloat16()`, which swaps fake
    parameters (and fails); the dry run builds them in bf16, so nothing is left to cast."""
    floating = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    if any(t.dtype != torch.bfloat16 for t in floating):
        raise TypeError("the dry run builds its model in bf16; a parameter or buffer is not")
    return module


class CoalescedCollectives(TorchDispatchMode):
    """The coalesced c10d collectives (megatron-core's gradient reduce-scatter and parameter all-gather
    over buckets) have no fake-tensor kernels: on fake tensors they finish at once, leaving their outputs
    as they are (a fake tensor has no values to exchange). Every other op passes through."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _COALESCED:
            from torch._C._distributed_c10d import FakeWork

            return FakeWork().boxed()
        return func(*args, **(kwargs or {}))


_COALESCED = {
    torch.ops.c10d.reduce_scatter_tensor_coalesced_.default,
    torch.ops.c10d.allgather_into_tensor_coalesced_.default,
    torch.ops.c10d.allreduce_coalesced_.default,
    torch.ops.c10d.allgather_coalesced_.default,
}


class _Permute(torch.autograd.Function):
    """The dispatch's permutation: each of the T tokens copied to the rows of its k experts, with its
    routing probability; keeps the row map (int64 per routing) for the backward."""

    @staticmethod
    def forward(ctx, tokens, probs, k):
        routings = tokens.shape[0] * k
        ctx.save_for_backward(tokens.new_zeros(routings, dtype=torch.long))
        ctx.shapes = tokens.shape, probs.shape
        return tokens.new_zeros(routings, tokens.shape[1]), probs.new_zeros(routings)

    @staticmethod
    def backward(ctx, grad_tokens, grad_probs):
        tokens, probs = ctx.shapes
        return grad_tokens.new_zeros(tokens), grad_probs.new_zeros(probs), None


class _Unpermute(torch.autograd.Function):
    """The combine: each token's k expert outputs summed back into its row (the probabilities were applied
    in the experts); keeps the row map."""

    @staticmethod
    def forward(ctx, rows, k):
        ctx.save_for_backward(rows.new_zeros(rows.shape[0], dtype=torch.long))
        ctx.shape = rows.shape
        return rows.new_zeros(rows.shape[0] // k, rows.shape[1])

    @staticmethod
    def backward(ctx, grad):
        return grad.new_zeros(ctx.shape), None


class BalancedTokenDispatcher:
    """Stand-in for megatron-core's token dispatchers (all-to-all, all-gather): the routing is balanced,
    so every local expert gets an equal share of the T x k routings this rank sends (as many come back
    from the other expert-parallel ranks as leave: the all-to-all keeps the count); what is kept is the
    permutation's. The real ones size their tensors from the routing's values, which fake tensors lack.
    Dropless routing can load one expert more: the measurement is for balanced routing."""

    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection=None):
        self.num_local_experts, self.topk = num_local_experts, config.moe_router_topk

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        self.hidden_shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        return _Permute.apply(tokens, probs, self.topk)

    def token_dispatch(self, hidden_states, probs):
        return hidden_states, probs

    def dispatch_postprocess(self, hidden_states, probs):
        import numpy as np

        share, extra = divmod(hidden_states.shape[0], self.num_local_experts)
        counts = np.array([share + (i < extra) for i in range(self.num_local_experts)])  # values: no tensor
        return hidden_states, counts, probs

    def combine_preprocess(self, hidden_states):
        return hidden_states

    def token_combine(self, hidden_states):
        return hidden_states

    def combine_postprocess(self, hidden_states):
        return _Unpermute.apply(hidden_states, self.topk).view(self.hidden_shape)


def dry_run_layer_spec(local_spec):
    """A model family's local layer spec (`local_spec`) with the stand-in norms and attention (TE's
    layout of saved tensors: a LayerNormLinear keeps the same tensors as a norm followed by a linear
    layer)."""
    from megatron.core.transformer.identity_op import IdentityOp

    layer = local_spec.submodules
    layer.input_layernorm = FusedRMSNorm
    layer.pre_mlp_layernorm = FusedRMSNorm
    attention = layer.self_attention.submodules
    attention.core_attention = FlashAttention
    for norm in ("q_layernorm", "k_layernorm"):  # the per-head query/key norms of a family that has them
        if getattr(attention, norm) is not IdentityOp:
            setattr(attention, norm, FusedRMSNorm)
    return local_spec


def dry_run_kernel_settings() -> dict:
    """The TransformerConfig settings of the cluster's kernels that the stand-ins serve."""
    return dict(
        bias_activation_fusion=True,  # the fused SwiGLU (patched to its stand-in)
        cross_entropy_loss_fusion=True,
        cross_entropy_fusion_impl="te",  # patched to its stand-in
        apply_rope_fusion=False,  # megatron-core's THD path, patched to the stand-in
        gradient_accumulation_fusion=True,  # patched to its stand-in
    )


@contextlib.contextmanager
def dry_run_patches() -> Iterator[None]:
    """Installs the stand-ins into megatron-core and torch.distributed, and removes them on exit."""
    import torch.distributed as dist
    from megatron.core import utils as mcore_utils
    from megatron.core.fusions import fused_bias_swiglu
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.common.language_module import language_module
    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel import layers
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.moe import moe_layer

    patches = [
        (transformer_block, "LayerNormImpl", FusedRMSNorm),  # the final norm
        (rope_utils, "_apply_rotary_pos_emb_thd", _rope_thd),
        (language_module, "te_parallel_cross_entropy", _cross_entropy),
        (fused_bias_swiglu, "swiglu", _swiglu),
        (fused_bias_swiglu, "swiglu_back", _swiglu_back),
        (mcore_utils, "local_multi_tensor_l2_norm", _l2_norm),
        (clip_grads, "l2_norm_impl", _l2_norm),
        (dist, "all_gather_object", _all_gather_object),
        (torch.nn.Module, "bfloat16", _bfloat16),
        (layers, "_grad_accum_fusion_available", True),
        (layers, "fused_weight_gradient_mlp_cuda", _WeightGradientAccumulation),
        (torch.optim, "AdamW", FusedAdam),  # the class megatron-core builds without TE or apex
        (layers, "HAVE_TE", True),  # only chooses TE's kept dummy weight gradients (below)
        (layers, "get_dummy_wgrad", _dummy_weight_gradients()),
        (tp_random, "FP8GlobalStateManager", _NoFP8),
        (tp_random, "activation_recompute_forward", lambda *_, **__: contextlib.nullcontext()),
        (tp_random, "fp8_autocast", lambda *_, **__: contextlib.nullcontext()),
        (moe_layer, "MoEAlltoAllTokenDispatcher", BalancedTokenDispatcher),
        (moe_layer, "MoEAllGatherTokenDispatcher", BalancedTokenDispatcher),
    ]
    missing = object()
    saved = [(owner, name, getattr(owner, name, missing)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            if value is missing:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
