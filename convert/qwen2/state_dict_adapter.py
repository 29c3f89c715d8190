"""The HF <-> megatron-core parameter mapping for Qwen2, declared once and used in both directions.

`MAPPINGS` is a table of HF key templates (with `{layer}`), the megatron-core key, and the HF shapes;
`Direct` copies, and the two special cases know both directions:

* `QKV`: HF's separate q/k/v projections <-> megatron-core's `linear_qkv`, which stacks, for each KV
  group g, [the query heads of g, k_g, v_g] along dim 0 (weights and biases alike).
* `GatedMLP`: HF's gate_proj and up_proj <-> `linear_fc1` = cat(gate, up) along dim 0.

Tensors here are whole (unsharded); tensor/pipeline sharding is megatron-core's business (its
sharded state dict reshards torch_dist checkpoints on load). Norm weights live under different names
in the local and Transformer Engine layer specs; `layer_names="te"` gives the TE names, which are also
the names torch_dist checkpoints use for either spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch

from .model import Qwen2Arch

LayerNames = Literal["local", "te"]
Shape = Callable[[Qwen2Arch], tuple[int, ...]]


@dataclass(frozen=True)
class Direct:
    hf: tuple[str, ...]
    mcore: str
    hf_shapes: tuple[Shape, ...]

    def to_mcore(self, arch: Qwen2Arch, tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0]

    def to_hf(self, arch: Qwen2Arch, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]


@dataclass(frozen=True)
class QKV(Direct):
    def to_mcore(self, arch: Qwen2Arch, tensors: list[torch.Tensor]) -> torch.Tensor:
        q, k, v = tensors
        g, rest = arch.num_query_groups, q.shape[1:]
        grouped = [q.reshape(g, -1, *rest), k.reshape(g, -1, *rest), v.reshape(g, -1, *rest)]
        return torch.cat(grouped, dim=1).reshape(-1, *rest)

    def to_hf(self, arch: Qwen2Arch, tensor: torch.Tensor) -> list[torch.Tensor]:
        g, d, rest = arch.num_query_groups, arch.head_dim, tensor.shape[1:]
        q, k, v = tensor.reshape(g, -1, *rest).split([arch.heads_per_group * d, d, d], dim=1)
        return [x.reshape(-1, *rest).contiguous() for x in (q, k, v)]


@dataclass(frozen=True)
class GatedMLP(Direct):
    def to_mcore(self, arch: Qwen2Arch, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors, dim=0)

    def to_hf(self, arch: Qwen2Arch, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [x.contiguous() for x in tensor.chunk(2, dim=0)]


def _h(a: Qwen2Arch) -> tuple[int, ...]:
    return (a.hidden_size,)


def _q(a: Qwen2Arch) -> int:
    return a.num_attention_heads * a.head_dim


def _kv(a: Qwen2Arch) -> int:
    return a.num_query_groups * a.head_dim


_L = "model.layers.{layer}."
_M = "decoder.layers.{layer}."
GLOBAL_MAPPINGS = (
    Direct(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", (lambda a: (a.vocab_size, a.hidden_size),)),
    Direct(("model.norm.weight",), "decoder.final_layernorm.weight", (_h,)),
    Direct(("lm_head.weight",), "output_layer.weight", (lambda a: (a.vocab_size, a.hidden_size),)),  # absent when tied
)
LAYER_MAPPINGS = (
    Direct((_L + "input_layernorm.weight",), _M + "input_layernorm.weight", (_h,)),
    QKV(tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"), _M + "self_attention.linear_qkv.weight",
        (lambda a: (_q(a), a.hidden_size), lambda a: (_kv(a), a.hidden_size), lambda a: (_kv(a), a.hidden_size))),
    QKV(tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv"), _M + "self_attention.linear_qkv.bias",
        (lambda a: (_q(a),), lambda a: (_kv(a),), lambda a: (_kv(a),))),
    Direct((_L + "self_attn.o_proj.weight",), _M + "self_attention.linear_proj.weight", (lambda a: (a.hidden_size, _q(a)),)),
    Direct((_L + "post_attention_layernorm.weight",), _M + "pre_mlp_layernorm.weight", (_h,)),
    GatedMLP((_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), _M + "mlp.linear_fc1.weight",
             (lambda a: (a.ffn_hidden_size, a.hidden_size),) * 2),
    Direct((_L + "mlp.down_proj.weight",), _M + "mlp.linear_fc2.weight", (lambda a: (a.hidden_size, a.ffn_hidden_size),)),
)
_TE_NORM_NAMES = {
    _M + "input_layernorm.weight": _M + "self_attention.linear_qkv.layer_norm_weight",
    _M + "pre_mlp_layernorm.weight": _M + "mlp.linear_fc1.layer_norm_weight",
}


@dataclass(frozen=True)
class BoundMapping:
    """One mapping with its keys filled in for a layer (or the globals)."""

    rule: Direct
    hf_keys: tuple[str, ...]
    mcore_key: str
    hf_shapes: tuple[tuple[int, ...], ...]


def bound_mappings(arch: Qwen2Arch, layer_names: LayerNames = "local") -> list[BoundMapping]:
    """Every mapping of the model, globals first then layer by layer (the order conversion streams in)."""
    out = []
    for rule in GLOBAL_MAPPINGS:
        if rule.mcore == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        out.append(BoundMapping(rule, rule.hf, rule.mcore, tuple(s(arch) for s in rule.hf_shapes)))
    for layer in range(arch.num_layers):
        for rule in LAYER_MAPPINGS:
            mcore = _TE_NORM_NAMES.get(rule.mcore, rule.mcore) if layer_names == "te" else rule.mcore
            out.append(BoundMapping(rule, tuple(k.format(layer=layer) for k in rule.hf), mcore.format(layer=layer),
                                    tuple(s(arch) for s in rule.hf_shapes)))
    return out


def hf_to_mcore(arch: Qwen2Arch, read_hf: Callable[[str], torch.Tensor],
                layer_names: LayerNames = "local") -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (megatron-core key, tensor), reading each HF tensor once through `read_hf(key)`."""
    for m in bound_mappings(arch, layer_names):
        tensors = [read_hf(key) for key in m.hf_keys]
        for key, tensor, shape in zip(m.hf_keys, tensors, m.hf_shapes):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{key}: shape {tuple(tensor.shape)}, expected {shape} from config.json")
        yield m.mcore_key, m.rule.to_mcore(arch, tensors)


def mcore_to_hf(arch: Qwen2Arch, read_mcore: Callable[[str], torch.Tensor],
                layer_names: LayerNames = "local") -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF key, tensor), the exact inverse of `hf_to_mcore`."""
    for m in bound_mappings(arch, layer_names):
        for key, tensor, shape in zip(m.hf_keys, m.rule.to_hf(arch, read_mcore(m.mcore_key)), m.hf_shapes):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{m.mcore_key} -> {key}: shape {tuple(tensor.shape)}, expected {shape}")
            yield key, tensor
