"""Whole-tensor views of the HF <-> megatron-core mapping, for tests: the converters stream blocks
(models/decoder/state_dict_adapter.py), the tests compare whole tensors.

    fused = to_mcore(mapping, [q, k, v]);  q, k, v = to_hf(mapping, fused)
"""

from __future__ import annotations

import torch

from common.errors import CheckpointError


def to_mcore(mapping, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The whole megatron-core tensor of a `BoundMapping` from the whole HF tensors, through its blocks."""
    for key, tensor, shape in zip(mapping.hf_keys, tensors, mapping.hf_shapes, strict=True):
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{key}: shape {tuple(tensor.shape)}, expected {shape} from config.json")
    out = torch.empty(mapping.mcore_shape, dtype=tensors[0].dtype)
    for hf, row, dest, count in mapping.blocks_for_mcore_rows(0, mapping.mcore_shape[0]):
        out[dest : dest + count] = tensors[hf][row : row + count]
    return out


def to_hf(mapping, tensor: torch.Tensor) -> list[torch.Tensor]:
    """The whole HF tensors of a `BoundMapping` from the whole megatron-core tensor, through its blocks."""
    if tuple(tensor.shape) != mapping.mcore_shape:
        raise CheckpointError(f"{mapping.key}: shape {tuple(tensor.shape)}, expected {mapping.mcore_shape}")
    out = [torch.empty(shape, dtype=tensor.dtype) for shape in mapping.hf_shapes]
    for hf, shape in enumerate(mapping.hf_shapes):
        for row, dest, count in mapping.blocks_for_hf_rows(hf, 0, shape[0]):
            out[hf][dest : dest + count] = tensor[row : row + count]
    return out
