"""The HF <-> megatron-core parameter mapping for Qwen2, declared once and used in both directions.

Each rule names its HF tensors (key templates with `{layer}`), the megatron-core tensor, and the HF
shapes expected from config.json, and describes the megatron-core tensor as *row blocks*: "rows
[m, m+n) of the megatron tensor are rows [h, h+n) of HF tensor i". Both directions, in memory or
streamed piece by piece through files, are copies of these blocks, so the layout is written once:

* `Direct`: one HF tensor, same rows.
* `GatedMLP`: `linear_fc1` = cat(gate_proj, up_proj) along dim 0.
* `QKV`: `linear_qkv` stacks, for each KV group g, [the query heads of g, k_g, v_g] (weights and
  biases alike).

Tensors here are whole (unsharded); tensor/pipeline sharding is megatron-core's business. Per-layer
megatron-core keys come in two spellings: the local layer spec's module names (`layer_names="local"`)
and Transformer Engine's, where the norms live inside the fused linear layers (`"te"`). torch_dist
checkpoints use neither directly: they stack the layers into one tensor per parameter, with a leading
layer axis, under the TE names (`BoundMapping.dist_key`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from common.errors import UnsupportedModelError

from .arch import Qwen2Arch

LayerNames = Literal["local", "te"]
Shape = Callable[[Qwen2Arch], tuple[int, ...]]


@dataclass(frozen=True)
class Rows:
    """Rows [mcore_start, mcore_start + count) of the megatron tensor are rows
    [hf_start, hf_start + count) of the mapping's HF tensor number `hf`."""

    hf: int
    hf_start: int
    mcore_start: int
    count: int


@dataclass(frozen=True)
class Direct:
    hf: tuple[str, ...]
    mcore: str
    hf_shapes: tuple[Shape, ...]

    def rows(self, arch: Qwen2Arch, hf_shapes: list[tuple[int, ...]]) -> list[Rows]:
        return [Rows(0, 0, 0, hf_shapes[0][0])]


@dataclass(frozen=True)
class GatedMLP(Direct):
    def rows(self, arch: Qwen2Arch, hf_shapes: list[tuple[int, ...]]) -> list[Rows]:
        gate, up = hf_shapes[0][0], hf_shapes[1][0]
        return [Rows(0, 0, 0, gate), Rows(1, 0, gate, up)]


@dataclass(frozen=True)
class QKV(Direct):
    def rows(self, arch: Qwen2Arch, hf_shapes: list[tuple[int, ...]]) -> list[Rows]:
        q, d = arch.heads_per_group * arch.head_dim, arch.head_dim
        blocks = []
        for g in range(arch.num_query_groups):
            start = g * (q + 2 * d)
            blocks += [
                Rows(0, g * q, start, q),
                Rows(1, g * d, start + q, d),
                Rows(2, g * d, start + q + d, d),
            ]
        return blocks


def _h(a: Qwen2Arch) -> tuple[int, ...]:
    return (a.hidden_size,)


def _q(a: Qwen2Arch) -> int:
    return a.num_attention_heads * a.head_dim


def _kv(a: Qwen2Arch) -> int:
    return a.num_query_groups * a.head_dim


def _vocab(a: Qwen2Arch) -> tuple[int, ...]:
    return (a.vocab_size, a.hidden_size)


_L = "model.layers.{layer}."
_M = "decoder.layers.{layer}."
EMBEDDING = Direct(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", (_vocab,))
LAYER_MAPPINGS = (
    Direct((_L + "input_layernorm.weight",), _M + "input_layernorm.weight", (_h,)),
    QKV(
        tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"),
        _M + "self_attention.linear_qkv.weight",
        (
            lambda a: (_q(a), a.hidden_size),
            lambda a: (_kv(a), a.hidden_size),
            lambda a: (_kv(a), a.hidden_size),
        ),
    ),
    QKV(
        tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv"),
        _M + "self_attention.linear_qkv.bias",
        (lambda a: (_q(a),), lambda a: (_kv(a),), lambda a: (_kv(a),)),
    ),
    Direct(
        (_L + "self_attn.o_proj.weight",),
        _M + "self_attention.linear_proj.weight",
        (lambda a: (a.hidden_size, _q(a)),),
    ),
    Direct((_L + "post_attention_layernorm.weight",), _M + "pre_mlp_layernorm.weight", (_h,)),
    GatedMLP(
        (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
        _M + "mlp.linear_fc1.weight",
        (lambda a: (a.ffn_hidden_size, a.hidden_size),) * 2,
    ),
    Direct(
        (_L + "mlp.down_proj.weight",),
        _M + "mlp.linear_fc2.weight",
        (lambda a: (a.hidden_size, a.ffn_hidden_size),),
    ),
)
FINAL_NORM = Direct(("model.norm.weight",), "decoder.final_layernorm.weight", (_h,))
OUTPUT_LAYER = Direct(
    ("lm_head.weight",), "output_layer.weight", (_vocab,)
)  # absent when embeddings are tied
_TE_NORM_NAMES = {
    _M + "input_layernorm.weight": _M + "self_attention.linear_qkv.layer_norm_weight",
    _M + "pre_mlp_layernorm.weight": _M + "mlp.linear_fc1.layer_norm_weight",
}


@dataclass(frozen=True)
class BoundMapping:
    """One rule with its keys and shapes filled in for one layer (`layer` is None for the globals)."""

    rule: Direct
    layer: int | None
    hf_keys: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    key: str  # the megatron-core module's state-dict key
    dist_key: str  # the torch_dist checkpoint key (layers stacked along a leading axis)
    rows: tuple[Rows, ...]

    @property
    def mcore_shape(self) -> tuple[int, ...]:
        return (sum(r.count for r in self.rows), *self.hf_shapes[0][1:])

    def __post_init__(self):
        # The declared blocks must tile the megatron tensor and every HF tensor exactly once.
        tiled = sorted((r.mcore_start, r.count) for r in self.rows)
        if [start for start, _ in tiled] != [sum(n for _, n in tiled[:i]) for i in range(len(tiled))]:
            raise UnsupportedModelError(
                f"{self.key}: the mapping's row blocks {tiled} leave gaps or overlap in the megatron-core "
                "tensor: this architecture's shapes are not what the Qwen2 mapping expects"
            )
        for i, (key, shape) in enumerate(zip(self.hf_keys, self.hf_shapes, strict=True)):
            mapped = sum(r.count for r in self.rows if r.hf == i)
            if mapped != shape[0]:
                raise UnsupportedModelError(
                    f"{key}: {shape[0]} rows in config.json's shape {shape}, {mapped} mapped to {self.key}: "
                    "this architecture's shapes are not what the Qwen2 mapping expects"
                )

    def blocks_for_mcore_rows(self, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
        """(hf index, hf row, destination row, count) filling megatron rows [start, stop)."""
        for r in self.rows:
            lo, hi = max(start, r.mcore_start), min(stop, r.mcore_start + r.count)
            if lo < hi:
                yield r.hf, r.hf_start + lo - r.mcore_start, lo - start, hi - lo

    def blocks_for_hf_rows(self, hf: int, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(megatron row, destination row, count) filling rows [start, stop) of HF tensor `hf`."""
        for r in self.rows:
            lo, hi = max(start, r.hf_start), min(stop, r.hf_start + r.count)
            if r.hf == hf and lo < hi:
                yield r.mcore_start + lo - r.hf_start, lo - start, hi - lo


def _bind(rule: Direct, arch: Qwen2Arch, layer: int | None, layer_names: LayerNames) -> BoundMapping:
    te_name = _TE_NORM_NAMES.get(rule.mcore, rule.mcore)
    key = te_name if layer_names == "te" else rule.mcore
    shapes = tuple(s(arch) for s in rule.hf_shapes)
    return BoundMapping(
        rule=rule,
        layer=layer,
        hf_keys=tuple(k.format(layer=layer) for k in rule.hf),
        hf_shapes=shapes,
        key=key.format(layer=layer),
        dist_key=te_name.replace("{layer}.", ""),
        rows=tuple(rule.rows(arch, list(shapes))),
    )


def bound_mappings(arch: Qwen2Arch, layer_names: LayerNames = "local") -> list[BoundMapping]:
    """Every mapping of the model in forward order: embedding, layer by layer, final norm, output layer."""
    out = [_bind(EMBEDDING, arch, None, layer_names)]
    for layer in range(arch.num_layers):
        out += [_bind(rule, arch, layer, layer_names) for rule in LAYER_MAPPINGS]
    out.append(_bind(FINAL_NORM, arch, None, layer_names))
    if not arch.tie_word_embeddings:
        out.append(_bind(OUTPUT_LAYER, arch, None, layer_names))
    return out


# Modules whose megatron-core state dict holds an `_extra_state` entry (Transformer Engine's FP8 scaling
# state; None without FP8), one ShardedObject per layer whatever the TP size. A complete checkpoint holds
# them, or megatron-core's default load refuses it ("Missing key in checkpoint state_dict"): the local
# spec's four linear layers, and TE's fused attention besides.
EXTRA_STATE_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
    "self_attention.core_attention",
)


def extra_state_objects(arch: Qwen2Arch) -> dict[str, None]:
    """The `_extra_state` ShardedObjects of a weights-only checkpoint by unique key, all None (no FP8
    state yet), as megatron-core names them for the stacked layers."""
    layers = arch.num_layers
    return {
        f"decoder.layers.{module}._extra_state/shard_{layer}_{layers}": None
        for layer in range(layers)
        for module in EXTRA_STATE_MODULES
    }
