"""The HF <-> megatron-core parameter mapping of the dense decoder, declared once and used in both directions.

The families here share the HF names of Llama (`model.layers.N.self_attn.q_proj.weight`, ...); the
rules a layer has follow its architecture: the QKV bias where `qkv_bias` (Qwen2), the per-head query
and key norms where `qk_layernorm` (Qwen3), the router and each expert's SwiGLU instead of the MLP where
`moe` (Qwen3 MoE: `mlp.gate`, `mlp.experts.E.{gate,up,down}_proj`). How a rule becomes row blocks, and
how blocks are copied either way, is models/weight_mapping.py.
"""

from __future__ import annotations

from models.weight_mapping import QKV, BoundMapping, Direct, GatedMLP, LayerNames, bind

from .arch import DecoderArch


def _h(a: DecoderArch) -> tuple[int, ...]:
    return (a.hidden_size,)


def _q(a: DecoderArch) -> int:
    return a.num_attention_heads * a.head_dim


def _kv(a: DecoderArch) -> int:
    return a.num_query_groups * a.head_dim


def _d(a: DecoderArch) -> tuple[int, ...]:
    return (a.head_dim,)


def _vocab(a: DecoderArch) -> tuple[int, ...]:
    return (a.vocab_size, a.hidden_size)


_L = "model.layers.{layer}."
_M = "decoder.layers.{layer}."
EMBEDDING = Direct(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", (_vocab,))
INPUT_NORM = Direct((_L + "input_layernorm.weight",), _M + "input_layernorm.weight", (_h,))
QKV_WEIGHT = QKV(
    tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"),
    _M + "self_attention.linear_qkv.weight",
    (
        lambda a: (_q(a), a.hidden_size),
        lambda a: (_kv(a), a.hidden_size),
        lambda a: (_kv(a), a.hidden_size),
    ),
)
QKV_BIAS = QKV(
    tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv"),
    _M + "self_attention.linear_qkv.bias",
    (lambda a: (_q(a),), lambda a: (_kv(a),), lambda a: (_kv(a),)),
)
# One RMSNorm weight shared by every query (key) head, applied per head before RoPE.
Q_NORM = Direct((_L + "self_attn.q_norm.weight",), _M + "self_attention.q_layernorm.weight", (_d,))
K_NORM = Direct((_L + "self_attn.k_norm.weight",), _M + "self_attention.k_layernorm.weight", (_d,))
OUTPUT_PROJECTION = Direct(
    (_L + "self_attn.o_proj.weight",),
    _M + "self_attention.linear_proj.weight",
    (lambda a: (a.hidden_size, _q(a)),),
)
PRE_MLP_NORM = Direct((_L + "post_attention_layernorm.weight",), _M + "pre_mlp_layernorm.weight", (_h,))
MLP_IN = GatedMLP(
    (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
    _M + "mlp.linear_fc1.weight",
    (lambda a: (a.ffn_hidden_size, a.hidden_size),) * 2,
)
MLP_OUT = Direct(
    (_L + "mlp.down_proj.weight",),
    _M + "mlp.linear_fc2.weight",
    (lambda a: (a.hidden_size, a.ffn_hidden_size),),
)
# A mixture of experts: megatron-core stores every expert of a layer along an expert axis under
# `mlp.experts.experts.`, for its one-module-per-expert layer and for TE's grouped GEMM alike.
_E = _M + "mlp.experts.local_experts.{expert}."
_DIST_EXPERTS = "decoder.layers.mlp.experts.experts."
ROUTER = Direct(
    (_L + "mlp.gate.weight",), _M + "mlp.router.weight", (lambda a: (a.moe.num_experts, a.hidden_size),)
)
EXPERT_IN = GatedMLP(
    (_L + "mlp.experts.{expert}.gate_proj.weight", _L + "mlp.experts.{expert}.up_proj.weight"),
    _E + "linear_fc1.weight",
    (lambda a: (a.moe.expert_ffn_hidden_size, a.hidden_size),) * 2,
    dist=_DIST_EXPERTS + "linear_fc1.weight",
)
EXPERT_OUT = Direct(
    (_L + "mlp.experts.{expert}.down_proj.weight",),
    _E + "linear_fc2.weight",
    (lambda a: (a.hidden_size, a.moe.expert_ffn_hidden_size),),
    dist=_DIST_EXPERTS + "linear_fc2.weight",
)
FINAL_NORM = Direct(("model.norm.weight",), "decoder.final_layernorm.weight", (_h,))
OUTPUT_LAYER = Direct(
    ("lm_head.weight",), "output_layer.weight", (_vocab,)
)  # absent when embeddings are tied
_TE_NORM_NAMES = {
    _M + "input_layernorm.weight": _M + "self_attention.linear_qkv.layer_norm_weight",
    _M + "pre_mlp_layernorm.weight": _M + "mlp.linear_fc1.layer_norm_weight",
}
# With experts, TE keeps the pre-MLP norm a module of its own, and its grouped GEMM numbers the experts'
# weights within one module.
_TE_MOE_NAMES = {
    _M + "input_layernorm.weight": _M + "self_attention.linear_qkv.layer_norm_weight",
    _E + "linear_fc1.weight": _M + "mlp.experts.linear_fc1.weight{expert}",
    _E + "linear_fc2.weight": _M + "mlp.experts.linear_fc2.weight{expert}",
}


def layer_rules(arch: DecoderArch) -> tuple[Direct, ...]:
    """The rules of one layer of `arch` outside its experts, in forward order."""
    return (
        INPUT_NORM,
        QKV_WEIGHT,
        *((QKV_BIAS,) if arch.qkv_bias else ()),
        *((Q_NORM, K_NORM) if arch.qk_layernorm else ()),
        OUTPUT_PROJECTION,
        PRE_MLP_NORM,
        *((ROUTER,) if arch.moe else (MLP_IN, MLP_OUT)),
    )


def bound_mappings(arch: DecoderArch, layer_names: LayerNames = "local") -> list[BoundMapping]:
    """Every mapping of the model in forward order: embedding, layer by layer (each expert after the
    router), final norm, output layer."""
    names = _TE_MOE_NAMES if arch.moe else _TE_NORM_NAMES
    out = [bind(EMBEDDING, arch, None, layer_names, names)]
    rules = layer_rules(arch)
    experts = range(arch.moe.num_experts) if arch.moe else ()
    for layer in range(arch.num_layers):
        out += [bind(rule, arch, layer, layer_names, names) for rule in rules]
        for expert in experts:
            out += [bind(rule, arch, layer, layer_names, names, expert) for rule in (EXPERT_IN, EXPERT_OUT)]
    out.append(bind(FINAL_NORM, arch, None, layer_names, names))
    if not arch.tie_word_embeddings:
        out.append(bind(OUTPUT_LAYER, arch, None, layer_names, names))
    return out


# Modules whose megatron-core state dict holds an `_extra_state` entry (Transformer Engine's FP8 scaling
# state; None without FP8), one ShardedObject per layer whatever the TP size. A complete checkpoint holds
# them, or megatron-core's default load refuses it ("Missing key in checkpoint state_dict"): the local
# spec's four linear layers (the MLP's two below), and TE's fused attention besides.
ATTENTION_EXTRA_STATE_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "self_attention.core_attention",
)
# With experts: each expert's two linear layers (one object per layer and expert, under the stacked
# experts' key), and TE's pre-MLP norm (a module of its own there).
EXPERT_EXTRA_STATE_MODULES = ("mlp.experts.experts.linear_fc1", "mlp.experts.experts.linear_fc2")
MOE_TE_NORM_EXTRA_STATE_MODULES = ("pre_mlp_layernorm",)
# Under the TE spec the separate norms are TE's RMSNorm, an operation of te.pytorch.ops whose extra state
# holds its quantization metadata: the per-head query/key norms (per layer) and the final norm (once).
TE_NORM_EXTRA_STATE_MODULES = ("self_attention.q_layernorm", "self_attention.k_layernorm")
FINAL_NORM_EXTRA_STATE = "decoder.final_layernorm._extra_state/shard_0_1"


def extra_state_objects(arch: DecoderArch) -> dict[str, None]:
    """The `_extra_state` ShardedObjects of a weights-only checkpoint by unique key, all None (no FP8
    state yet), as megatron-core names them, for a model of either spec (a loader ignores the ones its
    spec lacks)."""
    layers = arch.num_layers
    modules = ATTENTION_EXTRA_STATE_MODULES + (TE_NORM_EXTRA_STATE_MODULES if arch.qk_layernorm else ())
    modules += MOE_TE_NORM_EXTRA_STATE_MODULES if arch.moe else ("mlp.linear_fc1", "mlp.linear_fc2")
    objects = {
        f"decoder.layers.{module}._extra_state/shard_{layer}_{layers}": None
        for layer in range(layers)
        for module in modules
    }
    if arch.moe:
        experts = arch.moe.num_experts
        objects |= {
            f"decoder.layers.{module}._extra_state/shard_{layer}.{expert}_{layers}.{experts}": None
            for layer in range(layers)
            for expert in range(experts)
            for module in EXPERT_EXTRA_STATE_MODULES
        }
    return {**objects, FINAL_NORM_EXTRA_STATE: None}
