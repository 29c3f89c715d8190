"""Streaming writer of sharded safetensors checkpoints (the Hugging Face layout).

`safetensors.torch.save_file` needs every tensor of a file in memory at once, which for a 5 GB shard
is 5 GB of anonymous memory. The format is simple enough to stream instead: an 8-byte header length,
a JSON header giving each tensor's dtype, shape and byte range, then the raw bytes. Since the header
only needs shapes and dtypes, it is written first and each tensor's bytes follow, produced a few rows
at a time.

The next piece is read while the current one is written. Shards are cut like transformers does (`model-0000i-of-0000N.safetensors`, at most `max_shard_bytes`
each unless one tensor is larger) and described by `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .hf_io import SAFETENSORS_DTYPES

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


ReadRows = Callable[[TensorSpec, int, int], torch.Tensor]


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of tensors of at most `max_shard_bytes` each (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def write_sharded(out_dir: str | Path, specs: list[TensorSpec], read_rows: ReadRows, *, max_shard_bytes: int,
                  piece_bytes: Callable[[TensorSpec], int],
                  on_written: Callable[[TensorSpec, int], None] | None = None) -> list[Path]:
    """Writes `specs` as sharded safetensors plus the index; `read_rows(spec, start, stop)` supplies rows
    of one tensor, asked for in pieces of at most `piece_bytes(spec)` (at least one row). Returns the
    shard paths."""
    out_dir = Path(out_dir)
    shards = plan_shards(specs, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        with open(out_dir / name, "wb") as f:
            _write_file(f, shard, read_rows, piece_bytes, on_written)
            f.flush()
            os.fsync(f.fileno())
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
             "weight_map": {spec.key: name for name, shard in zip(names, shards) for spec in shard}}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / name for name in names]


def _write_file(f, specs: list[TensorSpec], read_rows: ReadRows, piece_bytes, on_written) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for spec in specs:
        header[spec.key] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps the tensor data 8-byte aligned
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    pieces = []
    for spec in specs:
        rows = spec.shape[0]
        step = max(1, piece_bytes(spec) // max(1, spec.nbytes // rows))
        pieces += [(spec, start, min(rows, start + step)) for start in range(0, rows, step)]
    # Reads the next piece while this one is written: reading and writing overlap, two pieces in memory.
    with ThreadPoolExecutor(max_workers=1) as prefetch:
        pending = prefetch.submit(read_rows, *pieces[0]) if pieces else None
        for i, (spec, start, stop) in enumerate(pieces):
            piece = pending.result()
            pending = prefetch.submit(read_rows, *pieces[i + 1]) if i + 1 < len(pieces) else None
            if tuple(piece.shape) != (stop - start, *spec.shape[1:]) or piece.dtype != spec.dtype:
                raise AssertionError(f"{spec.key} rows {start}:{stop}: got {tuple(piece.shape)} {piece.dtype}")
            f.write(piece.contiguous().reshape(-1).view(torch.uint8).numpy())
            if on_written:
                on_written(spec, piece.nbytes)
