"""megatron-core torch_dist checkpoints, written and read without building a model.

A torch_dist checkpoint is a PyTorch Distributed Checkpoint (DCP) directory whose tensors are named
by megatron-core's sharded keys, plus megatron-core's `metadata.json` (which backend) and `common.pt`
(non-tensor state). megatron-core loads any such checkpoint at any tensor/pipeline/data-parallel
layout, because DCP reads whichever stored chunks overlap the region each rank needs. So:

* `write_checkpoint` writes chunks that are produced one at a time, on demand, while DCP streams
  them to disk: the writer's memory is a few chunks, not the model.
* `TorchDistReader.read` reads any rectangular region of a stored tensor, whatever chunks the
  writer (this module, or a trainer at some TP/PP layout) cut it into.

The side files that make the project's checkpoints self-describing (`hf_config.json`, `tokenizer/`,
`provenance.json`) and a run directory's `iter_NNNNNNN/` checkpoints are named in `run_files.py`, which
needs no torch; this module checks such a checkpoint's data files (`checkpoint_problems`) and resolves
a run directory to its newest intact one.
"""

from __future__ import annotations

import io
import json
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from common.errors import CheckpointError, InputError

from .run_files import HF_CONFIG_FILE, complete_iterations, is_checkpoint

MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a global tensor: `produce()` returns it, shaped `sizes`, when DCP writes it."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.sizes) * self.dtype.itemsize


def write_checkpoint(
    out_dir: str | Path,
    chunks: list[Chunk],
    *,
    objects: dict[str, Any] | None = None,
    threads: int = 1,
    on_chunk_written: Callable[[Chunk], None] | None = None,
) -> None:
    """Writes `chunks` as a torch_dist checkpoint into the (empty) directory `out_dir`, with `objects`
    as megatron-core ShardedObjects ({unique key "KEY/shard_OFFSET_SHAPE": value}, stored as
    megatron-core stores them: the pickled list of the values under that key).

    With one thread, chunks are produced and written in list order (sequential reads of the source);
    with more, DCP spreads them over that many files and threads, largest first.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
    torch.save({}, out_dir / "common.pt")
    writer = dcp.FileSystemWriter(str(out_dir), thread_count=threads, sync_files=True)
    try:
        with warnings.catch_warnings():  # "no process group, assuming a single process": yes, by design
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            planner = _ChunkSavePlanner(chunks, objects or {}, on_chunk_written)
            dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
    except dcp.api.CheckpointException as wrapped:  # a BaseException; surface what actually failed
        (error, _trace), *_ = wrapped.failures.values()
        raise (planner.failure or error) from None
    if planner.failure is not None:  # raised in one of DCP's writer threads, which only print it
        raise planner.failure


class _ChunkSavePlanner(dcp.DefaultSavePlanner):
    """A DCP save planner whose items are `Chunk`s, produced lazily in `resolve_data`."""

    def __init__(self, chunks: list[Chunk], objects: dict[str, Any], on_chunk_written):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {(c.key, tuple(c.offsets)): c for c in chunks}
        if len(self._chunks) != len(chunks):
            raise ValueError("two chunks share a key and offsets")
        self._objects = objects
        self._on_written = on_chunk_written
        # The first exception of any thread: DCP's extra writer threads (threads > 1) let theirs end the
        # thread and go on, so a save would finish with those files missing.
        self.failure: BaseException | None = None

    def create_local_plan(self):
        objects = [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in self._objects]
        self.plan = SavePlan(
            objects
            + [
                WriteItem(
                    index=MetadataIndex(c.key, torch.Size(c.offsets)),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)),
                        properties=TensorProperties(dtype=c.dtype),
                        size=torch.Size(c.global_shape),
                    ),
                )
                for c in self._chunks.values()
            ]
        )
        return self.plan

    def resolve_data(self, write_item):
        try:
            return self._resolve(write_item)
        except BaseException as exc:
            self.failure = self.failure or exc
            raise

    def _resolve(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            stored = io.BytesIO()
            torch.save([self._objects[write_item.index.fqn]], stored)
            return stored
        chunk = self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        tensor = chunk.produce()
        if tuple(tensor.shape) != chunk.sizes or tensor.dtype != chunk.dtype:
            raise AssertionError(
                f"{chunk.key} at {chunk.offsets}: produced {tuple(tensor.shape)} {tensor.dtype}, "
                f"declared {chunk.sizes} {chunk.dtype}"
            )
        if self._on_written:
            self._on_written(chunk)
        return tensor.contiguous()


class TorchDistReader:
    """Reads regions of the tensors of a torch_dist checkpoint directory."""

    def __init__(self, checkpoint_dir: str | Path):
        self.path = Path(checkpoint_dir)
        if not (self.path / ".metadata").is_file():
            raise CheckpointError(f"{self.path} is not a complete torch_dist checkpoint (no .metadata)")
        self._reader = dcp.FileSystemReader(str(self.path))
        metadata = self._reader.read_metadata()
        self._reader.set_up_storage_reader(metadata, is_coordinator=True)
        self.tensors = {
            k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, dcp.TensorStorageMetadata)
        }

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._metadata(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._metadata(key).properties.dtype

    def _metadata(self, key: str):
        if key not in self.tensors:
            raise KeyError(f"{key} is not in the checkpoint at {self.path}")
        return self.tensors[key]

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The region [offsets, offsets + sizes) of tensor `key`, assembled from the stored chunks."""
        metadata = self._metadata(key)
        out = torch.empty(sizes, dtype=metadata.properties.dtype)
        items = create_read_items_for_chunk_list(
            key, metadata, [ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))]
        )
        if sum(math.prod(item.lengths) for item in items) != out.numel():
            raise CheckpointError(
                f"{self.path}: the stored chunks of {key} do not cover {sizes} at {offsets}"
            )
        self._reader.read_data(LoadPlan(items), _IntoTensor(out)).wait()
        return out


class _IntoTensor(dcp.DefaultLoadPlanner):
    """Routes every read item of a plan into one destination tensor."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self._out = out

    def lookup_tensor(self, index) -> torch.Tensor:
        return self._out


def checkpoint_problems(checkpoint_dir: str | Path) -> list[str]:
    """What keeps a checkpoint directory from loading: a missing or unreadable file, or a data file
    shorter than the byte ranges its `.metadata` refers to (a node that died mid-copy, a full quota).
    Reads the metadata and stats the files; reads no tensor data."""
    path = Path(checkpoint_dir)
    missing = [name for name in (".metadata", "metadata.json", "common.pt") if not (path / name).is_file()]
    if ".metadata" in missing:
        return [f"missing {name}" for name in missing]
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # a truncated or foreign pickle
        return [f"{path / '.metadata'} cannot be read ({type(exc).__name__}: {exc})"]
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    problems = [f"missing {name}" for name in missing]
    for name, end in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"missing {name}")
        elif file.stat().st_size < end:
            problems.append(f"{name} holds {file.stat().st_size:,} bytes, the metadata refers to {end:,}")
    return problems


def verify_checkpoint(checkpoint_dir: str | Path) -> Path:
    """`checkpoint_dir`, or CheckpointError naming what `checkpoint_problems` found in it."""
    problems = checkpoint_problems(checkpoint_dir)
    if problems:
        raise CheckpointError(
            f"{checkpoint_dir} is damaged: " + "; ".join(problems) + ". Use an earlier checkpoint (a run "
            "directory resolves to its newest intact one) or restore these files"
        )
    return Path(checkpoint_dir)


def resolve_checkpoint(path: str | Path, iteration: int | None = None) -> Path:
    """An intact checkpoint directory from either a checkpoint or a run directory (`iteration`, or the
    newest intact one: damaged newer ones are skipped with a warning that names them)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path} does not exist")
    if is_checkpoint(path):
        if iteration is not None:
            raise InputError(
                f"{path} is a single checkpoint; --iteration applies to a training run directory"
            )
        return verify_checkpoint(path)
    iterations = complete_iterations(path)
    if not iterations:
        raise CheckpointError(
            f"{path} is neither a torch_dist checkpoint (metadata.json + .metadata) nor a run "
            f"directory with complete iter_NNNNNNN/ checkpoints"
        )
    if iteration is not None:
        if iteration not in iterations:
            raise CheckpointError(
                f"{path}: no complete checkpoint for iteration {iteration}; available: {sorted(iterations)}"
            )
        return verify_checkpoint(iterations[iteration])
    for candidate in sorted(iterations, reverse=True):
        problems = checkpoint_problems(iterations[candidate])
        if not problems:
            return iterations[candidate]
        log.warning("skipping the damaged checkpoint %s: %s", iterations[candidate], "; ".join(problems))
    raise CheckpointError(
        f"{path}: every checkpoint is damaged ({', '.join(p.name for p in iterations.values())}; the "
        "warnings above say how); restore the missing files or start over"
    )


def read_hf_config(checkpoint_dir: str | Path) -> dict:
    """The Hugging Face config.json a checkpoint carries as hf_config.json (which model it holds)."""
    path = Path(checkpoint_dir) / HF_CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: this checkpoint does not say which model it holds "
            "(checkpoints written by convert_hf_to_mcore.py and pretrain_sft.py carry it)"
        )
    return json.loads(path.read_text())
