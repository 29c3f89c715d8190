"""The mechanism of the HF <-> megatron-core weight mappings, shared by every model family.

A family declares its rules once (its `state_dict_adapter`); each names its HF tensors (key templates
with `{layer}`), the megatron-core tensor, and the HF shapes expected from config.json, and describes the
megatron-core tensor as *row blocks*: "rows [m, m+n) of the megatron tensor are rows [h, h+n) of HF
tensor i". Both directions, in memory or streamed piece by piece through files, are copies of these
blocks, so the layout is written once:

* `Direct`: one HF tensor, same rows.
* `GatedMLP`: `linear_fc1` = cat(gate_proj, up_proj) along dim 0.
* `QKV`: `linear_qkv` stacks, for each KV group g, [the query heads of g, k_g, v_g] (weights and
  biases alike).

Tensors here are whole (unsharded); tensor/pipeline sharding is megatron-core's business. Per-layer
megatron-core keys come in two spellings: the local layer spec's module names (`layer_names="local"`)
and Transformer Engine's, where the norms live inside the fused linear layers (`"te"`). torch_dist
checkpoints use neither directly: they stack the layers into one tensor per parameter, with a leading
layer axis, under the TE names (`BoundMapping.dist_key`); an expert's tensors are stacked further along
an expert axis after the layer axis, under a key of megatron-core's own (`Direct.dist`), the same for
one module per expert and for TE's grouped experts (`BoundMapping.lead`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from common.errors import UnsupportedModelError

LayerNames = Literal["local", "te"]
Shape = Callable[[Any], tuple[int, ...]]  # the family's architecture -> an HF tensor's shape


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
    dist: str | None = None  # the torch_dist key where it is not the TE name less its layer index

    def rows(self, arch: Any, hf_shapes: list[tuple[int, ...]]) -> list[Rows]:
        return [Rows(0, 0, 0, hf_shapes[0][0])]


@dataclass(frozen=True)
class GatedMLP(Direct):
    def rows(self, arch: Any, hf_shapes: list[tuple[int, ...]]) -> list[Rows]:
        gate, up = hf_shapes[0][0], hf_shapes[1][0]
        return [Rows(0, 0, 0, gate), Rows(1, 0, gate, up)]


@dataclass(frozen=True)
class QKV(Direct):
    def rows(self, arch: Any, hf_shapes: list[tuple[int, ...]]) -> list[Rows]:
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


@dataclass(frozen=True)
class BoundMapping:
    """One rule with its keys and shapes filled in for one layer (`layer` is None for the globals) and,
    for an expert's tensor, one expert."""

    rule: Direct
    layer: int | None
    hf_keys: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    key: str  # the megatron-core module's state-dict key
    dist_key: str  # the torch_dist checkpoint key (layers, and experts, stacked along leading axes)
    rows: tuple[Rows, ...]
    # (index, count) of each leading axis of the torch_dist tensor: () for a global tensor, the layer
    # for a layer's, the layer and the expert for an expert's
    lead: tuple[tuple[int, int], ...] = ()

    @property
    def mcore_shape(self) -> tuple[int, ...]:
        return (sum(r.count for r in self.rows), *self.hf_shapes[0][1:])

    @property
    def dist_shape(self) -> tuple[int, ...]:
        """The global shape of the torch_dist tensor this tensor is part of."""
        return tuple(count for _, count in self.lead) + self.mcore_shape

    def dist_offsets(self, row: int = 0) -> tuple[int, ...]:
        """Where row `row` of this tensor starts in the torch_dist tensor."""
        return tuple(index for index, _ in self.lead) + (row,) + (0,) * (len(self.mcore_shape) - 1)

    def __post_init__(self):
        # The declared blocks must tile the megatron tensor and every HF tensor exactly once.
        tiled = sorted((r.mcore_start, r.count) for r in self.rows)
        if [start for start, _ in tiled] != [sum(n for _, n in tiled[:i]) for i in range(len(tiled))]:
            raise UnsupportedModelError(
                f"{self.key}: the mapping's row blocks {tiled} leave gaps or overlap in the megatron-core "
                "tensor: this architecture's shapes are not what its family's mapping expects"
            )
        for i, (key, shape) in enumerate(zip(self.hf_keys, self.hf_shapes, strict=True)):
            mapped = sum(r.count for r in self.rows if r.hf == i)
            if mapped != shape[0]:
                raise UnsupportedModelError(
                    f"{key}: {shape[0]} rows in config.json's shape {shape}, {mapped} mapped to {self.key}: "
                    "this architecture's shapes are not what its family's mapping expects"
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


def bind(
    rule: Direct,
    arch: Any,
    layer: int | None,
    layer_names: LayerNames,
    te_names: dict[str, str],
    expert: int | None = None,
) -> BoundMapping:
    """`rule` for one layer (None for the globals) of `arch`, and one expert of it for an expert's rule;
    `te_names` maps the local spec's keys that Transformer Engine spells differently (norms fused into
    the linear layers, grouped experts) to TE's."""
    te_name = te_names.get(rule.mcore, rule.mcore)
    key = te_name if layer_names == "te" else rule.mcore
    shapes = tuple(s(arch) for s in rule.hf_shapes)
    lead = () if layer is None else ((layer, arch.num_layers),)
    if expert is not None:
        lead += ((expert, arch.moe.num_experts),)
    return BoundMapping(
        rule=rule,
        layer=layer,
        hf_keys=tuple(k.format(layer=layer, expert=expert) for k in rule.hf),
        hf_shapes=shapes,
        key=key.format(layer=layer, expert=expert),
        dist_key=rule.dist or te_name.replace("{layer}.", ""),
        rows=tuple(rule.rows(arch, list(shapes))),
        lead=lead,
    )
