"""Template + tokenise the whole source into two spill files, keeping only per-conversation arrays.

Encoded batches come back from the workers in input order and are appended to the spill files
(token ids, loss masks: the packed files' own dtypes), so memory does not grow with the token count
and the output is the same for any worker count. Conversation i of the result occupies
`lengths[i]` items of each spill file, right after conversation i - 1.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .encode import EncodedBatch, EncodeSettings, encode_batch, one_tokenizer_thread
from .source import AlignedSource, RegistrySource
from .workers import ordered_map


class SpillFiles(NamedTuple):
    ids: Path
    mask: Path

    @classmethod
    def beside(cls, prefix: Path | str) -> SpillFiles:
        return cls(Path(f"{prefix}_spill_ids.partial"), Path(f"{prefix}_spill_mask.partial"))

    def remove(self) -> None:
        for path in self:
            path.unlink(missing_ok=True)


@dataclass
class EncodedConversations:
    """Per kept conversation, in input (= spill) order: lengths, loss tokens, split; plus the counts."""

    lengths: np.ndarray
    full_lengths: np.ndarray
    loss_tokens: np.ndarray
    held_out: np.ndarray
    dataset: np.ndarray  # the index of the run's dataset each conversation comes from
    rows: int
    dropped: Counter
    per_subset: dict[str, dict[str, dict[str, int]]]  # split ("train"/"valid") -> subset -> counts
    rows_per_dataset: list[int]
    dropped_per_dataset: list[Counter]
    drop_details_per_dataset: list[Counter]  # (reason, detail) -> rows; a few distinct details per reason

    def kept_per_dataset(self) -> np.ndarray:
        """Conversations kept of each dataset, both splits."""
        return np.bincount(self.dataset, minlength=len(self.rows_per_dataset))


def encode_to_spill(
    source: AlignedSource | RegistrySource, settings: EncodeSettings, spill: SpillFiles, workers: int
) -> EncodedConversations:
    from tqdm import tqdm

    collected = _Collector(len(settings.converters))
    encode = functools.partial(encode_batch, settings)
    with (
        open(spill.ids, "wb") as ids_file,
        open(spill.mask, "wb") as mask_file,
        tqdm(total=source.num_rows, unit="conv", desc="tokenise", unit_scale=True) as bar,
    ):
        for batch in ordered_map(encode, source.batches(), workers, initializer=one_tokenizer_thread):
            batch.ids.tofile(ids_file)
            batch.mask.tofile(mask_file)
            collected.add(batch)
            bar.update(batch.rows)
    return collected.result()


_DETAILS_PER_REASON = 8
# The per-conversation arrays of an EncodedBatch kept for the whole run, with their dtypes.
_ARRAYS = {"lengths": np.int32, "full_lengths": np.int64, "loss_tokens": np.int64, "held_out": bool}


@dataclass
class _Collector:
    datasets: int
    parts: dict[str, list[np.ndarray]] = field(default_factory=dict)
    rows: int = 0
    dropped: Counter = field(default_factory=Counter)
    per_subset: dict[tuple[str, str], Counter] = field(default_factory=dict)  # (split, subset) -> counts

    def __post_init__(self):
        self.rows_per_dataset = [0] * self.datasets
        self.dropped_per_dataset = [Counter() for _ in range(self.datasets)]
        self.drop_details_per_dataset = [Counter() for _ in range(self.datasets)]

    def add(self, batch: EncodedBatch) -> None:
        for name in _ARRAYS:
            self.parts.setdefault(name, []).append(getattr(batch, name))
        self.parts.setdefault("dataset", []).append(
            np.full(len(batch.lengths), batch.dataset, dtype=np.int32)
        )
        self.rows += batch.rows
        self.dropped.update(batch.dropped)
        self.rows_per_dataset[batch.dataset] += batch.rows
        self.dropped_per_dataset[batch.dataset].update(batch.dropped)
        details = self.drop_details_per_dataset[batch.dataset]
        for (reason, detail), rows in batch.drop_details.items():
            # a few distinct details per reason explain it; an unbounded set (free-text roles) would not
            if (reason, detail) in details or sum(r == reason for r, _ in details) < _DETAILS_PER_REASON:
                details[reason, detail] += rows
        for subset, length, held in zip(
            batch.subsets, batch.lengths.tolist(), batch.held_out.tolist(), strict=True
        ):
            counts = self.per_subset.setdefault(("valid" if held else "train", subset), Counter())
            counts["conversations"] += 1
            counts["tokens"] += length

    def result(self) -> EncodedConversations:
        splits: dict[str, dict[str, dict[str, int]]] = {"train": {}, "valid": {}}
        for (split, subset), counts in sorted(self.per_subset.items()):
            splits[split][subset] = dict(counts)
        arrays = {
            name: np.concatenate(self.parts[name]) if self.parts.get(name) else np.zeros(0, dtype)
            for name, dtype in {**_ARRAYS, "dataset": np.int32}.items()
        }
        return EncodedConversations(
            **arrays,
            rows=self.rows,
            dropped=self.dropped,
            per_subset=splits,
            rows_per_dataset=self.rows_per_dataset,
            dropped_per_dataset=self.dropped_per_dataset,
            drop_details_per_dataset=self.drop_details_per_dataset,
        )
