"""Reading Hugging Face safetensors checkpoints (sharded with an index, or a single file), row ranges
at a time.

Rows are read with positioned reads (`preadv`) straight into the destination tensor: one copy, large
sequential I/O, no page-fault-driven reads of a memory map, and the GIL released while the kernel
copies, so several writer threads overlap reading and writing. Every shard is validated by
safetensors when the reader opens, so a missing, truncated or corrupt file is named before any work
starts, and the rows read per tensor are counted, so a converter can prove each tensor was consumed
exactly once.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointFileError(ValueError):
    """A checkpoint file is missing, truncated or not what its index says."""


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
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] | None = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.model_dir / "model.safetensors").is_file():
            weight_map, files = None, ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{self.model_dir} has neither model.safetensors.index.json nor model.safetensors")
        missing = [name for name in files if not (self.model_dir / name).is_file()]
        if missing:
            raise CheckpointFileError(f"{self.model_dir}: shard(s) listed in the index are missing: {', '.join(missing)}")
        self.tensors: dict[str, StoredTensor] = {}
        for name in files:
            stored = _read_header(self.model_dir / name)
            if weight_map is not None:
                absent = sorted(k for k, f in weight_map.items() if f == name and k not in stored)
                if absent:
                    raise CheckpointFileError(f"{self.model_dir / name} lacks {len(absent)} tensor(s) the index "
                                              f"puts there, e.g. {absent[0]}")
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
        if not out.is_contiguous() or out.dtype != stored.dtype or tuple(out.shape) != (stop - start, *stored.shape[1:]):
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
        raise CheckpointFileError(f"{path}: not a readable safetensors file ({e}); it is probably truncated: "
                                  "download it again") from e
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
    header.pop("__metadata__", None)
    return {key: StoredTensor(path.name, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]),
                              8 + header_size + entry["data_offsets"][0]) for key, entry in header.items()}


def _pread_into(fd: int, out: torch.Tensor, offset: int) -> None:
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise EOFError(f"unexpected end of file reading {len(view)} bytes at offset {offset}")
        done += n
