"""Model FLOPs of a training step, for TFLOP/s and MFU, with attention counted per conversation.

Counted: the matrix multiplications of the forward pass (2 FLOPs per multiply-add) times 3 for
forward + backward; recomputation is not counted (model FLOPs, not hardware FLOPs). Per token and
layer, with hidden h, head dim d, heads n, query groups g, FFN width f:

    QKV projection  2 h (n + 2 g) d      output projection  2 n d h      SwiGLU MLP  2 x 3 h f

plus the vocabulary projection 2 h V per token (biases and norms are no matrix multiplications). With a
mixture of E experts of width f_e, k chosen per token, the MLP term is the router's 2 h E and the
chosen experts' 2 x 3 h f_e x k: a token's FLOPs count its active parameters, not all of them.
Causal attention in a conversation of length L costs QK^T and AV over the L (L + 1) / 2 visible
pairs: 2 x 2 x n d x L (L + 1) / 2 per layer. Megatron-LM's formula charges a packed row of S tokens
S^2 as if it were one sequence; for packs of many short conversations that overstates the work
several-fold. Padding tokens are not counted.
"""

from __future__ import annotations

import numpy as np


def attention_matrix_parameters(arch) -> int:
    """Weights of one layer's QKV and output projections."""
    h, d, n, g = arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_query_groups
    return h * (n + 2 * g) * d + n * d * h


def expert_parameters(arch) -> int:
    """Every expert's weights in one layer (none in a dense layer): what expert parallelism splits."""
    moe = arch.moe
    return 0 if moe is None else moe.num_experts * 3 * arch.hidden_size * moe.expert_ffn_hidden_size


def mlp_matrix_parameters(arch, active: bool = False) -> int:
    """Weights of one layer's SwiGLU MLP; with experts, the router's and every expert's (`active`: the
    chosen experts' only, those a token's FLOPs go through)."""
    moe = arch.moe
    if moe is None:
        return 3 * arch.hidden_size * arch.ffn_hidden_size
    experts = moe.experts_per_token if active else moe.num_experts
    return arch.hidden_size * moe.num_experts + experts * 3 * arch.hidden_size * moe.expert_ffn_hidden_size


def layer_matrix_parameters(arch) -> int:
    """Weights of one layer's matrix multiplications: QKV, output projection, MLP (every expert)."""
    return attention_matrix_parameters(arch) + mlp_matrix_parameters(arch)


def layer_parameters(arch) -> int:
    """Every parameter of one layer: its matrices, the two RMSNorm weights, and where the family has
    them the QKV bias and the query and key norms (one head wide each)."""
    qkv_bias = (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.head_dim if arch.qkv_bias else 0
    qk_norms = 2 * arch.head_dim if arch.qk_layernorm else 0
    return layer_matrix_parameters(arch) + 2 * arch.hidden_size + qkv_bias + qk_norms


def dense_flops_per_token(arch) -> float:
    """Forward FLOPs per token outside attention scores (projections, the MLP's active weights,
    vocabulary)."""
    active = attention_matrix_parameters(arch) + mlp_matrix_parameters(arch, active=True)
    return arch.num_layers * 2 * active + 2 * arch.hidden_size * arch.vocab_size


def attention_flops(arch, conversation_lengths: np.ndarray) -> float:
    """Forward FLOPs of causal QK^T and AV, summed over conversations."""
    lengths = np.asarray(conversation_lengths, dtype=np.float64)
    pairs = float((lengths * (lengths + 1) / 2).sum())
    return arch.num_layers * 4 * arch.num_attention_heads * arch.head_dim * pairs


def training_flops(arch, conversation_lengths: np.ndarray) -> float:
    """Model FLOPs of forward + backward over the given conversations."""
    tokens = float(np.sum(conversation_lengths, dtype=np.int64))
    return 3 * (dense_flops_per_token(arch) * tokens + attention_flops(arch, conversation_lengths))
