"""Packed (THD) causal attention for megatron-core's local layer spec, without Transformer Engine.

megatron-core's local `DotProductAttention` refuses packed sequences (docs/architecture.md), so the
local layer spec gets `PackedCoreAttention` instead when TE is not used (a family's `layer_spec`,
e.g. models/decoder/model.py): each conversation of a pack attends causally to itself only, as TE's
THD attention does.

- CUDA: varlen flash attention through `torch.nn.attention.varlen.varlen_attn` (one kernel for the
  whole pack, GQA without repeating K/V).
- CPU (and CUDA without varlen support): one `scaled_dot_product_attention` call per conversation.

With context parallelism each rank holds chunks r and 2 CP - 1 - r of every (padded) conversation
(sft/data.py `context_parallel_indices`, Transformer Engine's THD split). The attention all-gathers the
keys and values over the context-parallel group (TE's `cp_comm_type="all_gather"` scheme; the backward
reduce-scatters their gradients) and each local query chunk attends causally to its conversation's keys
up to the chunk's end: varlen flash attention with bottom-right-aligned causal masks on CUDA, one masked
SDPA call per chunk on CPU.

megatron-core hands the module query [T, heads, dim] and key/value [T, query groups, dim] after RoPE
(applied per conversation from `cu_seqlens`, at each token's global position under context
parallelism) and reshapes what it returns to [T, 1, heads x dim].
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
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
        return _flash_varlen(varlen, query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale)
    return _per_segment_sdpa(query, key, value, cu_seqlens, scale)


def _flash_varlen(varlen, query, key, value, cu_q, cu_k, max_q: int, max_k: int, scale):
    """Causal varlen flash attention of query segment i against key segment i (aligned at the bottom
    right where the keys outnumber the queries, as flash attention aligns them)."""
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
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    return varlen_attn(query, key, value, cu_q, cu_k, max_q, max_k, **kwargs)


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


class _AllGather(torch.autograd.Function):
    """Concatenates every rank's tensor along dim 0, in rank order; the backward reduce-scatters the
    gradient (each rank gets the sum over ranks of its own share)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        tensor = tensor.contiguous()
        out = tensor.new_empty((dist.get_world_size(group) * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_into_tensor(out, tensor, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None


@dataclass(frozen=True)
class ContextParallelChunks:
    """Where a context-parallel rank's query chunks and every rank's gathered keys lie, for a row whose
    padded conversations start at `cu_seqlens_padded` (each a multiple of 2 x CP tokens long).

    `global_order[p]` is the row of the all-gathered tensor (rank-major) that holds global position p;
    chunk j of the local queries (`query_bounds[j]` to `query_bounds[j + 1]`) attends to global positions
    `key_ranges[j]` = (its conversation's start, the chunk's end), causally aligned at the end."""

    global_order: torch.Tensor
    query_bounds: list[int]
    key_ranges: list[tuple[int, int]]

    @classmethod
    def build(cls, cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> ContextParallelChunks:
        bounds = cu_seqlens_padded.tolist()
        local_width = bounds[-1] // cp_size
        order, query_bounds, key_ranges = [], [0], []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            if (end - start) % (2 * cp_size):
                raise ValueError(
                    f"a segment of {end - start} tokens is not a multiple of 2 x CP = {2 * cp_size}: the "
                    "rows must be built with the layout's pad multiple (sft/data.py)"
                )
            chunk, local_start = (end - start) // (2 * cp_size), start // cp_size
            for part in range(2 * cp_size):
                owner, second = (part, 0) if part < cp_size else (2 * cp_size - 1 - part, 1)
                first_row = owner * local_width + local_start + second * chunk
                order.append(torch.arange(first_row, first_row + chunk))
            for part in (cp_rank, 2 * cp_size - 1 - cp_rank):
                query_bounds.append(query_bounds[-1] + chunk)
                key_ranges.append((start, start + (part + 1) * chunk))
        return cls(torch.cat(order), query_bounds, key_ranges)


def context_parallel_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_padded: torch.Tensor,
    scale: float,
    group,
) -> torch.Tensor:
    """Causal attention within each conversation of a row split over the context-parallel `group` (see
    the module doc); query [T_local, heads, dim], key/value [T_local, groups, dim] hold this rank's
    chunks; returns [T_local, heads, dim]."""
    chunks = ContextParallelChunks.build(cu_seqlens_padded, dist.get_world_size(group), dist.get_rank(group))
    order = chunks.global_order.to(key.device)
    key, value = (_AllGather.apply(t, group).index_select(0, order) for t in (key, value))
    return attend_query_chunks(query, key, value, chunks, scale)


def attend_query_chunks(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, chunks: ContextParallelChunks, scale: float
) -> torch.Tensor:
    """This rank's query chunks [T_local, heads, dim] against the whole row's keys and values
    [T, groups, dim], in global order: the kernel of `context_parallel_causal_attention`."""
    varlen = _varlen_attention() if query.is_cuda else None
    if varlen is not None:
        return _flash_varlen_chunks(varlen, query, key, value, chunks, scale)
    return _per_chunk_sdpa(query, key, value, chunks, scale)


def _per_chunk_sdpa(query, key, value, chunks: ContextParallelChunks, scale):
    out = torch.empty_like(query)
    gqa = key.shape[1] != query.shape[1]
    bounds = chunks.query_bounds
    for q_start, q_end, (k_start, k_end) in zip(bounds[:-1], bounds[1:], chunks.key_ranges, strict=True):
        length, visible = q_end - q_start, k_end - k_start
        # query i of the chunk sits at key position visible - length + i: it sees the keys up to there
        mask = torch.ones(length, visible, dtype=torch.bool, device=query.device).tril(visible - length)
        q = query[q_start:q_end].transpose(0, 1)
        k, v = (t[k_start:k_end].transpose(0, 1) for t in (key, value))
        out[q_start:q_end] = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa
        ).transpose(0, 1)
    return out


def _flash_varlen_chunks(varlen, query, key, value, chunks: ContextParallelChunks, scale):
    """One varlen call: query chunk j against the keys of `key_ranges[j]`, copied out contiguously."""
    index = torch.cat([torch.arange(a, b) for a, b in chunks.key_ranges]).to(key.device)
    key, value = key.index_select(0, index), value.index_select(0, index)
    key_lengths = [b - a for a, b in chunks.key_ranges]
    cu_q = torch.tensor(chunks.query_bounds, device=query.device)
    cu_k = torch.tensor([0, *itertools.accumulate(key_lengths)], device=query.device)
    max_q = max(b - a for a, b in itertools.pairwise(chunks.query_bounds))
    return _flash_varlen(varlen, query, key, value, cu_q, cu_k, max_q, max(key_lengths), scale)


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
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"PackedCoreAttention has no attention dropout (got {dropout}); none of the registered "
                "families trains with one: set attention_dropout=0 in the model's config"
            )
        self.config = config
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.cp_group = None
        if config.context_parallel_size > 1:
            if pg_collection is not None:
                self.cp_group = pg_collection.cp
            else:
                from megatron.core import parallel_state

                self.cp_group = parallel_state.get_context_parallel_group()

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
        if self.cp_group is not None:
            if packed_seq_params.cu_seqlens_q_padded is None:
                raise ValueError("context parallelism needs cu_seqlens_q_padded (rows padded to 2 x CP)")
            return context_parallel_causal_attention(
                query, key, value, packed_seq_params.cu_seqlens_q_padded, self.softmax_scale, self.cp_group
            )
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


def packed_attention_kernel(device: str, context_parallel: int = 1) -> str:
    """Which kernel `PackedCoreAttention` runs on `device` at this context-parallel size, for the log."""
    unit = "conversation" if context_parallel == 1 else "chunk"
    if device != "cuda":
        kernel = f"per-{unit} torch SDPA on CPU"
    elif _varlen_attention() is None:
        kernel = f"per-{unit} torch SDPA on CUDA (torch {torch.__version__} has no varlen flash attention)"
    else:
        kernel = "torch varlen flash attention (torch.nn.attention.varlen)"
    if context_parallel > 1:
        kernel += f", keys and values all-gathered over the {context_parallel} context-parallel ranks"
    return kernel
