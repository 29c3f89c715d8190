"""Hugging Face safetensors checkpoints (sharded with an index, or a single file), read and written
a few rows at a time, so a 32B model never has to fit in memory.

Reading (`HFSafetensorsReader`): rows are read with positioned reads (`preadv`) straight into the
destination tensor: one copy, large sequential I/O, no page-fault-driven reads of a memory map, and
the GIL released while the kernel copies, so several writer threads overlap reading and writing.
Every shard is validated by safetensors when the reader opens, so a missing, truncated or corrupt
file is named before any work starts, and the rows read per tensor are counted, so a converter can
prove each tensor was consumed exactly once.

Writing (`write_sharded`): `safetensors.torch.save_file` needs every tensor of a file in memory at
once (5 GB of anonymous memory for a 5 GB shard). The format is simple enough to stream instead: an
8-byte header length, a JSON header giving each tensor's dtype, shape and byte range, then the raw
bytes. The header only needs shapes and dtypes, so it is written first and each tensor's bytes follow,
produced a few rows at a time; the next piece is read while the current one is written. Shards are
cut like transformers does (`model-0000i-of-0000N.safetensors`, at most `max_shard_bytes` each unless
one tensor is larger) and described by `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class StoredTensor:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file


class HFSafetensorsReader:
    def __init__(self, model_dir: str | Path):
        self._fds: dict[str, int] = {}  # file descriptors, opened on first read
        self._lock = threading.Lock()
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] | None = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.model_dir / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise CheckpointError(f"{self.model_dir} has neither {INDEX_FILE} nor {SINGLE_FILE}")
        missing = [name for name in files if not (self.model_dir / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{self.model_dir}: shard(s) listed in the index are missing: {', '.join(missing)}"
            )
        self.tensors: dict[str, StoredTensor] = {}
        for name in files:
            stored = _read_header(self.model_dir / name)
            if weight_map is not None:
                absent = sorted(k for k, f in weight_map.items() if f == name and k not in stored)
                if absent:
                    raise CheckpointError(
                        f"{self.model_dir / name} lacks {len(absent)} tensor(s) the index "
                        f"puts there, e.g. {absent[0]}"
                    )
                stored = {k: v for k, v in stored.items() if weight_map.get(k) == name}
            self.tensors.update(stored)
        self._files = files
        self.rows_read: Counter = Counter()

    def keys(self) -> set[str]:
        return set(self.tensors)

    def files(self) -> list[Path]:
        return [self.model_dir / name for name in self._files]

    def _stored(self, key: str) -> StoredTensor:
        if key not in self.tensors:
            raise KeyError(f"{key} is not in the checkpoint at {self.model_dir}")
        return self.tensors[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._stored(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return self._stored(key).dtype

    def read_rows(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of a tensor (dim 0), read into `out` (contiguous) or a new tensor."""
        stored = self._stored(key)
        if out is None:
            out = torch.empty((stop - start, *stored.shape[1:]), dtype=stored.dtype)
        if (
            not out.is_contiguous()
            or out.dtype != stored.dtype
            or tuple(out.shape) != (stop - start, *stored.shape[1:])
        ):
            raise ValueError(f"{key}: cannot read rows {start}:{stop} into {tuple(out.shape)} {out.dtype}")
        row_bytes = math.prod(stored.shape[1:]) * stored.dtype.itemsize
        _pread_into(self._fd(stored.file), out, stored.offset + start * row_bytes)
        with self._lock:
            self.rows_read[key] += stop - start
        return out

    def read(self, key: str) -> torch.Tensor:
        return self.read_rows(key, 0, self.shape(key)[0])

    def not_read_exactly_once(self) -> list[str]:
        """Keys whose rows were not all read exactly once (in total rows read != rows held)."""
        return sorted(k for k in self.tensors if self.rows_read[k] != self.shape(k)[0])

    def _fd(self, name: str) -> int:
        with self._lock:
            if name not in self._fds:
                self._fds[name] = os.open(self.model_dir / name, os.O_RDONLY)
            return self._fds[name]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        self.close()


def _read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, after safetensors itself validated it (sizes, offsets)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except SafetensorError as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); it is probably truncated: download it again"
        ) from e
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
    header.pop("__metadata__", None)
    return {
        key: StoredTensor(
            path.name,
            SAFETENSORS_DTYPES[entry["dtype"]],
            tuple(entry["shape"]),
            8 + header_size + entry["data_offsets"][0],
        )
        for key, entry in header.items()
    }


def _pread_into(fd: int, out: torch.Tensor, offset: int) -> None:
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise EOFError(f"unexpected end of file reading {len(view)} bytes at offset {offset}")
        done += n


# Writing -------------------------------------------------------------------------------------------


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


def write_sharded(
    out_dir: str | Path,
    specs: list[TensorSpec],
    read_rows: ReadRows,
    *,
    max_shard_bytes: int,
    piece_bytes: Callable[[TensorSpec], int],
    on_written: Callable[[TensorSpec, int], None] | None = None,
) -> list[Path]:
    """Writes `specs` as sharded safetensors plus the index; `read_rows(spec, start, stop)` supplies rows
    of one tensor, asked for in pieces of at most `piece_bytes(spec)` (at least one row). Returns the
    shard paths."""
    out_dir = Path(out_dir)
    shards = plan_shards(specs, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        with open(out_dir / name, "wb") as f:
            _write_file(f, shard, read_rows, piece_bytes, on_written)
            f.flush()
            os.fsync(f.fileno())
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in specs)},
        "weight_map": {spec.key: name for name, shard in zip(names, shards, strict=True) for spec in shard},
    }
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / name for name in names]


def _write_file(f, specs: list[TensorSpec], read_rows: ReadRows, piece_bytes, on_written) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for spec in specs:
        header[spec.key] = {
            "dtype": _DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
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
                raise AssertionError(
                    f"{spec.key} rows {start}:{stop}: got {tuple(piece.shape)} {piece.dtype}"
                )
            f.write(piece.contiguous().reshape(-1).view(torch.uint8).numpy())
            if on_written:
                on_written(spec, piece.nbytes)
