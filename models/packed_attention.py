"""Packed (THD) causal attention for megatron-core's local layer spec, without Transformer Engine.

megatron-core's local `DotProductAttention` refuses packed sequences (docs/architecture.md), so the
local layer spec gets `PackedCoreAttention` instead when TE is not used (a family's `layer_spec`,
e.g. models/decoder/model.py): each conversation of a pack attends causally to itself only, as TE's
THD attention does.

- CUDA: varlen flash attention through `torch.nn.attention.varlen.varlen_attn` (one kernel for the
  whole pack, GQA without repeating K/V).
- CPU (and CUDA without varlen support): one `scaled_dot_product_attention` call per conversation.

megatron-core hands the module query [T, heads, dim] and key/value [T, query groups, dim] after RoPE
(applied per conversation from `cu_seqlens`) and reshapes what it returns to [T, 1, heads x dim].
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@functools.cache
def _varlen_attention():
    """torch's varlen flash attention and whether it takes (window_size, enable_gqa) (torch >= 2.12)
    or the older (is_causal) arguments; None when this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    return varlen_attn, "window_size" in parameters, "enable_gqa" in parameters


def packed_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention within each segment [cu_seqlens[i], cu_seqlens[i+1]); returns [T, heads, dim]."""
    varlen = _varlen_attention() if query.is_cuda else None
    if varlen is not None:
        return _flash_varlen(varlen, query, key, value, cu_seqlens, max_seqlen, scale)
    return _per_segment_sdpa(query, key, value, cu_seqlens, scale)


def _flash_varlen(varlen, query, key, value, cu_seqlens, max_seqlen, scale):
    varlen_attn, takes_window, takes_gqa = varlen
    if not takes_gqa and key.shape[1] != query.shape[1]:
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    kwargs = {"scale": scale}
    if takes_window:
        kwargs["window_size"] = (-1, 0)  # causal
        if takes_gqa:
            kwargs["enable_gqa"] = True
    else:
        kwargs["is_causal"] = True
    cu = cu_seqlens.to(torch.int32)
    return varlen_attn(query, key, value, cu, cu, max_seqlen, max_seqlen, **kwargs)


def _per_segment_sdpa(query, key, value, cu_seqlens, scale):
    out = torch.empty_like(query)
    bounds = cu_seqlens.tolist()
    gqa = key.shape[1] != query.shape[1]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # [heads, L, dim]
        out[start:end] = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=gqa
        ).transpose(0, 1)
    return out


class PackedCoreAttention(torch.nn.Module):
    """Drop-in `core_attention` submodule for megatron-core's local spec that requires THD packing."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout=None,
        softmax_scale: float | None = None,
        cp_comm_type=None,
        pg_collection=None,
    ):
        super().__init__()
        if config.context_parallel_size != 1:
            raise ValueError(
                "PackedCoreAttention does not implement context parallelism; it needs Transformer Engine"
            )
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"PackedCoreAttention has no attention dropout (got {dropout}); Qwen2.5 uses none"
            )
        self.config = config
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query,
        key,
        value,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            raise ValueError("PackedCoreAttention needs packed (THD) input: pass packed_seq_params")
        if attention_bias is not None:
            raise ValueError("PackedCoreAttention does not support an attention bias")
        return packed_causal_attention(
            query,
            key,
            value,
            packed_seq_params.cu_seqlens_q,
            packed_seq_params.max_seqlen_q,
            self.softmax_scale,
        )


def with_packed_attention(local_spec):
    """A copy of megatron-core's local layer spec whose core attention is `PackedCoreAttention`."""
    spec = copy.deepcopy(local_spec)
    spec.submodules.self_attention.submodules.core_attention = PackedCoreAttention
    return spec


def packed_attention_kernel(device: str) -> str:
    """Which kernel `packed_causal_attention` runs on `device`, for the log."""
    if device != "cuda":
        return "per-conversation torch SDPA on CPU"
    if _varlen_attention() is None:
        return (
            f"per-conversation torch SDPA on CUDA (torch {torch.__version__} has no varlen flash attention)"
        )
    return "torch varlen flash attention (torch.nn.attention.varlen)"
