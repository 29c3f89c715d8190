"""Hugging Face safetensors (Qwen2/2.5, Qwen3, Llama 3.x) -> megatron-core torch_dist checkpoint, streamed.

    python tools/convert_hf_to_mcore.py --hf /models/Qwen2.5-32B --out ckpt/qwen2.5-32b-mcore

The output loads into the trainer at any tensor/pipeline/data-parallel layout. Every tensor of the
model is cut into chunks of at most `max_chunk_bytes`, along the row blocks of the mapping
(models/decoder/state_dict_adapter.py), and each chunk is assembled from memory-mapped HF rows only
when the writer asks for it: anonymous memory stays at a few chunks whatever the model size. Before
anything is written, every HF tensor the config implies is checked for presence, shape and dtype, and
unknown tensors are refused; afterwards, that every row of every HF tensor was read exactly once.
The output appears under its final name only when complete.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from common.errors import CheckpointError, InputError
from common.files import atomic_directory, file_fingerprint, write_json_atomic
from common.provenance import tool_info
from formats.hf_safetensors import HFSafetensorsReader
from formats.run_files import HF_CONFIG_FILE, PROVENANCE_FILE, TOKENIZER_DIR
from formats.torch_dist import Chunk, write_checkpoint
from models.hf_config import HF_CONFIG_NAME
from models.registry import Arch, family_of, read_arch
from models.weight_mapping import BoundMapping

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_CHUNK_BYTES = 32 << 20  # see plan_chunks
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


@dataclass
class ConversionResult:
    out_dir: Path
    tensors: int
    chunks: int
    bytes_written: int
    seconds: float


def check_source(arch: Arch, reader: HFSafetensorsReader) -> torch.dtype:
    """Every tensor the config implies is present with its shape, nothing else is, and all share one
    floating dtype, which is returned. Raises CheckpointError naming the offending tensors."""
    mappings = family_of(arch).bound_mappings(arch)
    expected = {key: shape for m in mappings for key, shape in zip(m.hf_keys, m.hf_shapes, strict=True)}
    missing = sorted(expected.keys() - reader.keys())
    unexpected = sorted(reader.keys() - expected.keys())
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    if unexpected:
        hint = (
            " (tie_word_embeddings is true, yet lm_head.weight is stored)"
            if "lm_head.weight" in unexpected
            else ""
        )
        problems.append(
            f"{len(unexpected)} tensor(s) the config does not describe{hint}, e.g. {unexpected[:3]}"
        )
    for key, shape in expected.items():
        if key in reader.keys() and reader.shape(key) != shape:
            problems.append(f"{key}: shape {reader.shape(key)}, expected {shape} from config.json")
    dtypes = {key: reader.dtype(key) for key in expected if key in reader.keys()}
    kinds = set(dtypes.values())
    if len(kinds) > 1 or any(not d.is_floating_point for d in kinds):
        problems.append(f"tensors must share one floating dtype; found {sorted(map(str, kinds))}")
    if problems:
        raise CheckpointError(f"{reader.model_dir}: " + "; ".join(problems))
    return kinds.pop()


def _row_ranges(m: BoundMapping, max_rows: int) -> list[tuple[int, int]]:
    """Cuts [0, rows) into ranges of at most `max_rows`, at block boundaries where blocks allow, so most
    chunks are a plain slice of one HF tensor."""
    ranges, start = [], 0
    for block in sorted(m.rows, key=lambda r: r.mcore_start):
        end = block.mcore_start + block.count
        if end - start <= max_rows:
            continue
        if block.mcore_start > start:
            ranges.append((start, block.mcore_start))
            start = block.mcore_start
        while end - start > max_rows:
            ranges.append((start, start + max_rows))
            start += max_rows
    if start < m.mcore_shape[0]:
        ranges.append((start, m.mcore_shape[0]))
    return ranges


def _produce(
    reader: HFSafetensorsReader, m: BoundMapping, start: int, stop: int, dtype: torch.dtype
) -> torch.Tensor:
    rows = torch.empty((stop - start, *m.mcore_shape[1:]), dtype=dtype)
    for hf, row, dest, count in m.blocks_for_mcore_rows(start, stop):
        key = m.hf_keys[hf]
        if reader.dtype(key) == dtype:
            reader.read_rows(key, row, row + count, out=rows[dest : dest + count])
        else:
            rows[dest : dest + count] = reader.read_rows(key, row, row + count)
    return rows.view(*(1 for _ in m.lead), *rows.shape)  # a size-1 axis per stacked layer / expert axis


def plan_chunks(
    arch: Arch,
    reader: HFSafetensorsReader,
    dtype: torch.dtype,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> list[Chunk]:
    """The chunks of the torch_dist checkpoint, in forward order; per-layer tensors are stacked along a
    leading layer axis (and an expert's along an expert axis after it), as megatron-core stores them.

    Chunks are small (32 MiB by default) because DCP's writer keeps the last chunk it wrote under each
    tensor name until the file is closed: its memory is one chunk per distinct name per writer thread.
    Smaller chunks cost no throughput (docs/benchmarks.md, checkpoint conversion).
    """
    chunks = []
    for m in family_of(arch).bound_mappings(arch, "te"):
        row_bytes = math.prod(m.mcore_shape[1:]) * dtype.itemsize
        for start, stop in _row_ranges(m, max(1, max_chunk_bytes // row_bytes)):
            chunks.append(
                Chunk(
                    key=m.dist_key,
                    global_shape=m.dist_shape,
                    offsets=m.dist_offsets(start),
                    sizes=(1,) * len(m.lead) + (stop - start,) + m.mcore_shape[1:],
                    dtype=dtype,
                    produce=partial(_produce, reader, m, start, stop, dtype),
                )
            )
    return chunks


def copy_tokenizer_files(src: Path, dest: Path) -> list[str]:
    names = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if names:
        dest.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy2(src / name, dest / name)
    return names


def convert_hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    force: bool = False,
    threads: int = 2,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
) -> ConversionResult:
    """Converts the HF checkpoint in `hf_dir` into a torch_dist checkpoint at `out_dir`.
    `dtype`: "bf16" or "fp32", or None to keep the source dtype."""
    from tqdm import tqdm

    started = time.perf_counter()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config_file = hf_dir / HF_CONFIG_NAME
    if not config_file.is_file():
        raise InputError(f"{config_file} not found: --hf must be a Hugging Face model directory")
    arch = read_arch(config_file)
    reader = HFSafetensorsReader(hf_dir)
    source_dtype = check_source(arch, reader)
    target = DTYPES[dtype] if dtype else source_dtype
    chunks = plan_chunks(arch, reader, target, max_chunk_bytes)
    total = sum(c.nbytes for c in chunks)
    log.info(
        "converting %s: %d layers, %d HF tensors (%s) -> %d chunks, %.2f GB %s",
        hf_dir,
        arch.num_layers,
        len(reader.keys()),
        source_dtype,
        len(chunks),
        total / 1e9,
        target,
    )
    with (
        atomic_directory(out_dir, force=force) as tmp,
        tqdm(total=total, unit="B", unit_scale=True, desc="hf -> mcore", disable=not progress) as bar,
    ):

        def written(chunk: Chunk) -> None:
            bar.update(chunk.nbytes)
            bar.set_postfix_str(
                chunk.key.removeprefix("decoder.layers.")
                + (f" layer {chunk.offsets[0]}" if chunk.key.startswith("decoder.layers.") else ""),
                refresh=False,
            )

        objects = family_of(arch).extra_state_objects(arch)
        write_checkpoint(tmp, chunks, objects=objects, threads=threads, on_chunk_written=written)
        if reader.not_read_exactly_once():
            raise AssertionError(
                f"internal error: not read exactly once: {reader.not_read_exactly_once()[:5]}"
            )
        (tmp / HF_CONFIG_FILE).write_text(config_file.read_text())
        tokenizer_files = copy_tokenizer_files(hf_dir, tmp / TOKENIZER_DIR)
        write_json_atomic(
            tmp / PROVENANCE_FILE,
            {
                **tool_info("convert_hf_to_mcore"),
                "source": {
                    "path": str(hf_dir.resolve()),
                    "files": [file_fingerprint(p) for p in [config_file, *reader.files()]],
                },
                "source_dtype": str(source_dtype),
                "dtype": str(target),
                "arch": arch.to_dict(),
                "chunks": len(chunks),
                "bytes": total,
                "tokenizer_files": tokenizer_files,
            },
        )
    seconds = time.perf_counter() - started
    log.info(
        "wrote %s: %.2f GB in %.1f s (%.2f GB/s)%s",
        out_dir,
        total / 1e9,
        seconds,
        total / 1e9 / seconds,
        "" if tokenizer_files else "; no tokenizer files in the source (pass --tokenizer when exporting)",
    )
    return ConversionResult(out_dir, len(reader.keys()), len(chunks), total, seconds)
