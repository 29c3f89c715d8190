"""The packed SFT dataset on disk: what tools/preprocess_sft.py writes and the trainer reads.

A dataset is a path prefix P with five files:

    P_input_ids.{bin,idx}   int32 token ids      megatron-core indexed dataset
    P_loss_mask.{bin,idx}   uint8, 1 = trained   the same structure, one byte per token
    P_meta.json             format version, seq_length, tokenizer, statistics; written last

One Megatron *document* is one pack (at most seq_length tokens) and each *sequence* in it one
conversation, so the two indexed datasets share their document and sequence structure. The meta
file's presence marks a complete output: everything else is written under temporary names and
renamed first (`PackedWriter`). `PackedDataset` reads packs back (memory-mapped) and refuses files
that disagree with each other or with the meta.

    with PackedWriter(prefix, seq_length=32768) as writer:
        starts = writer.reserve(conversation_lengths, pack_offsets)   # room for the packs
        writer.region_writer().write(starts[0], ids, mask)            # each pack, by any process
        writer.commit({"tokenizer": {...}, "stats": {...}})
    pack = PackedDataset(prefix)[0]                     # Pack(input_ids, loss_mask, lengths)
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DataError
from common.files import commit, partial_path, write_json_atomic

FORMAT_VERSION = "k2think-packed-sft/1"
TOKEN_DTYPE, MASK_DTYPE = np.int32, np.uint8  # int32: Qwen's 152K vocabulary exceeds uint16


VALIDATION_SUFFIX = "_valid"


def validation_prefix(prefix: str | Path) -> str:
    """Where tools/preprocess_sft.py --valid-fraction writes the held-out packs of the dataset `prefix`."""
    return f"{prefix}{VALIDATION_SUFFIX}"


@dataclass(frozen=True)
class PackedPaths:
    """The files of the dataset at `prefix`."""

    prefix: str

    @property
    def input_ids(self) -> str:
        """The indexed-dataset path prefix of the token ids (megatron-core adds .bin/.idx)."""
        return f"{self.prefix}_input_ids"

    @property
    def loss_mask(self) -> str:
        return f"{self.prefix}_loss_mask"

    @property
    def meta(self) -> Path:
        return Path(f"{self.prefix}_meta.json")

    def data_files(self) -> list[Path]:
        return [
            Path(f"{stem}{suffix}")
            for stem in (self.input_ids, self.loss_mask)
            for suffix in (".bin", ".idx")
        ]

    def all_files(self) -> list[Path]:
        return [*self.data_files(), self.meta]


def indexed_dataset_module():
    """megatron.core.datasets.indexed_dataset, imported without the TE/apex fallback warnings.

    Importing it loads all of megatron.core, which warns that Transformer Engine and apex are missing;
    that matters to the trainer (which reports it), not to reading or writing indexed files.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
        previous = logging.getLogger("megatron").level
        logging.getLogger("megatron").setLevel(logging.WARNING)
        try:
            from megatron.core.datasets import indexed_dataset
        finally:
            logging.getLogger("megatron").setLevel(previous)
    return indexed_dataset


def padded_lengths(lengths, multiple: int) -> np.ndarray:
    """Conversation lengths rounded up to `multiple`: the space each takes in a row once padded (for
    context parallelism); packs are made so that these fit `seq_length` (`pad_multiple` in the meta)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return -(-lengths // multiple) * multiple


# megatron-core's .idx: magic, version (1), dtype code, sequence count, document count, then the int32
# sequence lengths, int64 byte pointers and int64 document indices.
_INDEX_MAGIC, INDEX_HEADER = b"MMIDIDX\x00\x00", struct.Struct("<9sQBQQ")


_DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int32): 4}  # megatron-core's DType enum


def _write_index(path: Path, dtype: type, sequence_lengths: np.ndarray, document_indices: np.ndarray) -> None:
    """A megatron-core .idx for sequences of `sequence_lengths` stored back to back in the .bin."""
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    pointers = (np.cumsum(lengths) - lengths) * np.dtype(dtype).itemsize  # each sequence's byte offset
    header = INDEX_HEADER.pack(
        _INDEX_MAGIC, 1, _DTYPE_CODES[np.dtype(dtype)], len(sequence_lengths), len(document_indices)
    )
    with open(path, "wb") as f:
        f.write(header)
        f.write(np.asarray(sequence_lengths, dtype=np.int32).tobytes())
        f.write(pointers.astype(np.int64).tobytes())
        f.write(np.asarray(document_indices, dtype=np.int64).tobytes())


def _index_problem(path: Path) -> str | None:
    """What is wrong with the header or size of a megatron-core .idx file; None if nothing is."""
    size = path.stat().st_size
    if size < INDEX_HEADER.size:
        return f"{size} bytes, shorter than the {INDEX_HEADER.size}-byte header"
    with open(path, "rb") as f:
        magic, version, _dtype, sequences, documents = INDEX_HEADER.unpack(f.read(INDEX_HEADER.size))
    if magic != _INDEX_MAGIC or version != 1:
        return "not a megatron-core indexed dataset index"
    expected = INDEX_HEADER.size + 12 * sequences + 8 * documents
    if size != expected:
        return f"{size:,} bytes where its header describes {expected:,}"
    return None


# Writing ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionWriter:
    """Writes packs at reserved token positions of a PackedWriter's files; picklable and usable from
    any process (positional writes: regions of different writers never overlap)."""

    input_ids_bin: str
    loss_mask_bin: str

    def write(self, token_start: int, input_ids: np.ndarray, loss_mask: np.ndarray) -> None:
        if len(input_ids) != len(loss_mask):
            raise DataError(
                f"{self.input_ids_bin}: a region of {len(input_ids)} token ids but {len(loss_mask)} "
                "loss-mask values (the writer must be given both arrays of each pack, of one length)"
            )
        for path, values, dtype in (
            (self.input_ids_bin, input_ids, TOKEN_DTYPE),
            (self.loss_mask_bin, loss_mask, MASK_DTYPE),
        ):
            data = np.ascontiguousarray(values, dtype=dtype)
            fd = os.open(path, os.O_WRONLY)
            try:
                view, offset = memoryview(data).cast("B"), token_start * data.itemsize
                while view:
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
            finally:
                os.close(fd)


class PackedWriter:
    """Writes packs under temporary names; `commit(meta)` writes the indexes, renames the data files
    into place and writes the meta file last. Leaving the `with` block without a commit removes the
    temporary files.

    Packs are reserved in bulk (`reserve`) and then written in any order, by any process, through
    `region_writer()`: the files come out the same whatever the order."""

    def __init__(self, prefix: str | Path, seq_length: int, pad_multiple: int = 1):
        self.paths = PackedPaths(str(prefix))
        self.seq_length, self.pad_multiple = seq_length, pad_multiple
        self.paths.meta.parent.mkdir(parents=True, exist_ok=True)
        self._bins = (
            partial_path(f"{self.paths.input_ids}.bin"),
            partial_path(f"{self.paths.loss_mask}.bin"),
        )
        for path in self._bins:
            path.write_bytes(b"")
        # The structure so far, one array per reserve(): conversation lengths, conversations per pack.
        self._conversation_lengths: list[np.ndarray] = []
        self._pack_sizes: list[np.ndarray] = []
        self._packs = self._tokens = 0

    @property
    def packs(self) -> int:
        return self._packs

    def region_writer(self) -> RegionWriter:
        return RegionWriter(*map(str, self._bins))

    def reserve(self, conversation_lengths, pack_offsets) -> np.ndarray:
        """Room for packs after those already there, given as ragged arrays: pack p holds the
        conversations of lengths `conversation_lengths[pack_offsets[p]:pack_offsets[p + 1]]`. Returns
        each pack's first token position, for `region_writer().write`."""
        lengths = np.asarray(conversation_lengths, dtype=np.int64)
        offsets = np.asarray(pack_offsets, dtype=np.int64)
        per_pack = lambda values: np.diff(np.concatenate([[0], np.cumsum(values)])[offsets])  # noqa: E731
        totals = per_pack(lengths)
        padded = per_pack(padded_lengths(lengths, self.pad_multiple))
        bad = (padded > self.seq_length) | (per_pack(lengths <= 0) > 0) | (np.diff(offsets) == 0)
        if bad.any():
            p = int(np.flatnonzero(bad)[0])
            pack = lengths[offsets[p] : offsets[p + 1]].tolist()
            raise DataError(
                f"{self.paths.prefix}: pack {self.packs + p}: conversation lengths {pack} "
                f"({int(padded[p])} tokens padded to {self.pad_multiple}) do not make a pack of at most "
                f"seq_length {self.seq_length} tokens"
            )
        starts = self._tokens + np.cumsum(totals) - totals
        self._conversation_lengths.append(lengths.astype(np.int32))
        self._pack_sizes.append(np.diff(offsets))
        self._packs += len(totals)
        self._tokens += int(totals.sum())
        for path, dtype in zip(self._bins, (TOKEN_DTYPE, MASK_DTYPE), strict=True):
            os.truncate(path, self._tokens * np.dtype(dtype).itemsize)
        return starts

    def commit(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Finishes the files and publishes them; returns the meta written (with the format's own keys)."""
        lengths = np.concatenate([np.zeros(0, np.int32), *self._conversation_lengths])
        pack_sizes = np.concatenate([np.zeros(0, np.int64), *self._pack_sizes])
        documents = np.concatenate([[0], np.cumsum(pack_sizes)])  # each pack's first conversation
        for stem, dtype in ((self.paths.input_ids, TOKEN_DTYPE), (self.paths.loss_mask, MASK_DTYPE)):
            _write_index(partial_path(f"{stem}.idx"), dtype, lengths, documents)
        name = Path(self.paths.prefix).name
        meta = {
            "format": FORMAT_VERSION,
            "seq_length": self.seq_length,
            "pad_multiple": self.pad_multiple,
            "files": {"input_ids": f"{name}_input_ids", "loss_mask": f"{name}_loss_mask"},
            "dtypes": {"input_ids": "int32", "loss_mask": "uint8"},
            "layout": "one Megatron document = one pack; one sequence = one conversation",
            **meta,
        }
        meta["stats"] = {**meta.get("stats", {}), "packs": self.packs}
        self.paths.meta.unlink(missing_ok=True)  # an old meta must never describe new, half-renamed files
        for path in self.paths.data_files():
            commit(partial_path(path), path)
        write_json_atomic(self.paths.meta, meta)
        return meta

    def discard(self) -> None:
        for path in self.paths.data_files():
            partial_path(path).unlink(missing_ok=True)

    def __enter__(self) -> PackedWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()  # after a commit there is nothing left to remove


# Reading ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pack:
    input_ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # uint8 [n]: 1 where the token is a training target
    lengths: np.ndarray  # int32 [conversations], summing to n


class PackedDataset:
    """Random access to the packs of one prefix (memory-mapped, nothing loaded eagerly)."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        self.paths = PackedPaths(self.prefix)
        if not self.paths.meta.is_file():
            raise DataError(
                f"{self.paths.meta} not found: run tools/preprocess_sft.py --output-prefix {prefix} "
                "(the meta file is written last, so a missing one means an incomplete output)"
            )
        try:
            self.meta = json.loads(self.paths.meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(
                f"{self.paths.meta} cannot be read ({exc}): re-run tools/preprocess_sft.py --output-prefix "
                f"{prefix} --force"
            ) from exc
        if self.meta.get("format") != FORMAT_VERSION:
            raise DataError(
                f"{self.paths.meta}: format {self.meta.get('format')!r}, this trainer reads "
                f"{FORMAT_VERSION!r}; re-run tools/preprocess_sft.py"
            )
        self.seq_length = int(self.meta["seq_length"])
        self._ids = self._open(self.paths.input_ids, TOKEN_DTYPE)
        self._mask = self._open(self.paths.loss_mask, MASK_DTYPE)
        self._documents = self._ids.document_indices
        self._lengths = self._ids.sequence_lengths
        self._longest_padded: dict[int, int] = {}
        self._check()
        self._check_sampled_values()

    @property
    def _fix(self) -> str:
        return (
            f"re-run tools/preprocess_sft.py --output-prefix {self.prefix} --force (or copy the dataset "
            "again, if this is a copy)"
        )

    def _open(self, stem: str, dtype: type):
        """One indexed dataset, its .bin size checked against what its .idx describes (a truncated copy,
        a full disk): megatron-core would otherwise fail at the first read past the end, unnamed."""
        for suffix in (".idx", ".bin"):
            if not Path(stem + suffix).is_file():
                raise DataError(
                    f"{stem}{suffix} not found: the dataset {self.prefix} is incomplete; {self._fix}"
                )
        problem = _index_problem(Path(stem + ".idx"))
        if problem:
            raise DataError(f"{stem}.idx cannot be read ({problem}): the file is damaged; {self._fix}")
        try:
            dataset = indexed_dataset_module().IndexedDataset(stem)
        except Exception as exc:  # a damage the header check cannot see fails in numpy, unnamed
            raise DataError(f"{stem}.idx cannot be read ({exc}): the file is damaged; {self._fix}") from exc
        index = dataset.index
        if index.dtype != dtype:
            raise DataError(f"{stem}: {index.dtype} values, expected {np.dtype(dtype)}; {self._fix}")
        expected = int(index.sequence_lengths.sum(dtype=np.int64)) * np.dtype(dtype).itemsize
        actual = Path(stem + ".bin").stat().st_size
        if actual != expected:
            raise DataError(
                f"{stem}.bin holds {actual:,} bytes, its .idx describes {expected:,} "
                f"({'truncated' if actual < expected else 'extra bytes at the end'}): {self._fix}"
            )
        return dataset

    @property
    def pad_multiple(self) -> int:
        """Conversations were packed as if rounded up to this multiple (1: as they are), so every pack
        still fits seq_length when each conversation is padded to any divisor of it."""
        return int(self.meta.get("pad_multiple", 1))

    @property
    def chat_template(self) -> str | None:
        """The name of the chat template the conversations were encoded with (None: not recorded)."""
        return self.meta.get("template")

    @property
    def enable_thinking(self) -> bool:
        """Whether a reasoning template kept the thoughts (LLaMA-Factory's enable_thinking; True where
        not recorded, its default)."""
        return bool(self.meta.get("settings", {}).get("enable_thinking", True))

    @property
    def vocab_size(self) -> int:
        """The size of the tokenizer's vocabulary the data was made with."""
        return int(self.meta["tokenizer"]["vocab_size"])

    def _check(self) -> None:
        if not np.array_equal(self._documents, self._mask.document_indices) or not np.array_equal(
            self._lengths, self._mask.sequence_lengths
        ):
            raise DataError(
                f"{self.paths.input_ids}.idx and {self.paths.loss_mask}.idx describe different packs: the "
                "two files come from different preprocessing runs; re-run tools/preprocess_sft.py"
            )
        stats = self.meta["stats"]
        tokens = int(self._lengths.sum(dtype=np.int64))
        if len(self) != stats["packs"] or tokens != stats.get("tokens", tokens):
            raise DataError(
                f"{self.prefix}: {len(self)} packs of {tokens:,} tokens on disk, {self.paths.meta} says "
                f"{stats['packs']} of {stats.get('tokens', tokens):,}: the meta file belongs to another "
                f"preprocessing run; {self._fix}"
            )
        longest = self.longest_padded_pack(self.pad_multiple)
        if longest > self.seq_length:
            raise DataError(
                f"{self.prefix}: a pack holds {longest} tokens (conversations padded to multiples of "
                f"{self.pad_multiple}), more than seq_length {self.seq_length}; "
                "re-run tools/preprocess_sft.py"
            )

    def _check_sampled_values(self, max_packs: int = 64) -> None:
        """Token ids within the tokenizer's vocabulary and loss-mask values 0/1, in up to `max_packs`
        packs spread evenly over the dataset (bit rot or a foreign file; reading all of a 10^10-token
        dataset here would take minutes)."""
        for pack in np.unique(np.linspace(0, len(self) - 1, min(len(self), max_packs)).astype(np.int64)):
            found = self[int(pack)]
            bad_ids = (found.input_ids < 0) | (found.input_ids >= self.vocab_size)
            if bad_ids.any():
                raise DataError(
                    f"{self.paths.input_ids}.bin: pack {pack} holds token id "
                    f"{int(found.input_ids[bad_ids][0])}, "
                    f"outside the tokenizer's vocabulary of {self.vocab_size} ({self.paths.meta}): the file "
                    f"is damaged or was written with another tokenizer; {self._fix}"
                )
            if found.loss_mask.max(initial=0) > 1:
                raise DataError(
                    f"{self.paths.loss_mask}.bin: pack {pack} holds the mask value "
                    f"{int(found.loss_mask.max())} "
                    f"(only 0 and 1 are written): the file is damaged; {self._fix}"
                )

    def __len__(self) -> int:
        return len(self._documents) - 1

    def conversation_lengths(self, pack: int) -> np.ndarray:
        return self._lengths[self._documents[pack] : self._documents[pack + 1]]

    def longest_padded_pack(self, pad_multiple: int) -> int:
        """Tokens of the longest pack once each conversation is padded to a multiple of `pad_multiple`."""
        if pad_multiple not in self._longest_padded:
            padded = padded_lengths(self._lengths, pad_multiple)
            longest = int(np.add.reduceat(padded, self._documents[:-1]).max()) if len(self) else 0
            self._longest_padded[pad_multiple] = longest
        return self._longest_padded[pad_multiple]

    def __getitem__(self, pack: int) -> Pack:
        if not 0 <= pack < len(self):
            raise IndexError(f"pack {pack} out of range for {self.prefix} ({len(self)} packs)")
        first = int(self._documents[pack])
        lengths = self.conversation_lengths(pack)
        total = int(lengths.sum())
        # A pack's conversations are contiguous on disk: one read spanning them all. Copied out of the
        # memory map, which megatron-core's IndexedDataset unmaps when it is collected: a view would
        # then crash the process that still holds the pack.
        ids, mask = self._ids.get(first, 0, total), self._mask.get(first, 0, total)
        return Pack(ids.copy(), mask.copy(), lengths.copy())
