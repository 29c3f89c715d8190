"""Where the preprocessor's rows come from, read in batches so memory does not grow with the input.

* `AlignedSource`: the aligned AM-Thinking parquet (tools/get_am_dataset.py; columns `conversations`,
  `system`, `subset`), read with pyarrow, only the columns the run needs.
* `RegistrySource`: the datasets a LLaMA-Factory registry names (`preprocess.registry`), one after
  another, each through the `datasets` library in streaming mode: local json/jsonl/parquet files one
  file at a time, hub datasets from a snapshot at the entry's revision. `num_samples` draws the rows
  LLaMA-Factory draws (`sample_counts`) and keeps them in file order: the draw decides how many times
  each row appears.

Both take `max_samples` (LLaMA-Factory's): each dataset's first rows only, after the num_samples draw.

Both yield `RowBatch`es, the tokenising workers' tasks.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import InputError
from common.hub import download_dataset

from .registry import DatasetEntry

log = logging.getLogger(__name__)

ROWS_PER_BATCH = 256  # one worker task: large enough to amortise the transfer, small enough to balance


@dataclass(frozen=True)
class RowBatch:
    """Rows of one dataset of the run (its index), as a pyarrow record batch or a list of dicts."""

    dataset: int
    rows: Any

    def to_rows(self) -> list[dict[str, Any]]:
        return self.rows if isinstance(self.rows, list) else self.rows.to_pylist()

    def __len__(self) -> int:
        return len(self.rows) if isinstance(self.rows, list) else self.rows.num_rows


@dataclass(frozen=True)
class AlignedSource:
    path: Path
    num_rows: int  # the rows read: the file's, or its first max_samples
    columns: tuple[str, ...]  # those read: conversations, and system / subset where present

    @classmethod
    def open(cls, path: Path, need_system_column: bool, max_samples: int | None = None) -> AlignedSource:
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:
            raise InputError(f"cannot read {path} as parquet: {exc}") from exc
        names = parquet.schema_arrow.names
        if "conversations" not in names:
            raise InputError(
                f"{path} has no `conversations` column (columns: {names}); align it with "
                "tools/get_am_dataset.py"
            )
        if need_system_column and "system" not in names:
            raise InputError(f"--system-source column needs a `system` column in {path}")
        columns = tuple(name for name in ("conversations", "system", "subset") if name in names)
        return cls(Path(path), _at_most(parquet.metadata.num_rows, max_samples), columns)

    @property
    def inputs(self) -> list[Path]:
        return [self.path]

    def batches(self, rows_per_batch: int = ROWS_PER_BATCH) -> Iterator[RowBatch]:
        """Record batches (pyarrow) of the needed columns, in file order."""
        import pyarrow.parquet as pq

        left = self.num_rows
        for batch in pq.ParquetFile(self.path).iter_batches(
            batch_size=rows_per_batch, columns=list(self.columns)
        ):
            if left <= 0:
                return
            yield RowBatch(0, batch.slice(0, left))
            left -= batch.num_rows


@dataclass(frozen=True)
class RegistrySource:
    entries: tuple[DatasetEntry, ...]
    seed: int
    cache_dir: str | None = None  # the hub snapshots' cache (default: Hugging Face's)
    max_samples: int | None = None  # of each dataset, only the first rows (after num_samples)

    @property
    def num_rows(self) -> int | None:
        """The rows the run reads, where known without reading them (for the progress bar)."""
        total = 0
        for entry in self.entries:
            if entry.num_samples is not None:
                total += _at_most(entry.num_samples, self.max_samples)
            elif entry.file_type == "parquet":
                total += _at_most(sum(_parquet_rows(path) for path in entry.files), self.max_samples)
            elif self.max_samples is None:
                return None
            else:
                total += self.max_samples  # at most; unknown without reading the dataset
        return total

    @property
    def inputs(self) -> list[Path]:
        return [path for entry in self.entries for path in entry.files]

    def batches(self, rows_per_batch: int = ROWS_PER_BATCH) -> Iterator[RowBatch]:
        draws = np.random.RandomState(self.seed)  # one stream for the run's datasets, in their order
        for index, entry in enumerate(self.entries):
            rows = self._rows(entry)
            if entry.num_samples is not None:
                counts = sample_counts(self._count_rows(entry), entry, draws, self.max_samples)
                rows = _resampled(rows, counts)
            elif self.max_samples is not None:
                rows = itertools.islice(rows, self.max_samples)
            batch: list[dict[str, Any]] = []
            for row in rows:
                batch.append(row)
                if len(batch) == rows_per_batch:
                    yield RowBatch(index, batch)
                    batch = []
            if batch:
                yield RowBatch(index, batch)

    def _rows(self, entry: DatasetEntry) -> Iterator[dict[str, Any]]:
        if entry.hub_repo:
            yield from _checked_rows(entry, self._hub_dataset(entry), entry.where)
            return
        for path in entry.files:
            yield from _checked_rows(entry, _file_dataset(entry, path), f"{entry.where}, file {path}")

    def _count_rows(self, entry: DatasetEntry) -> int:
        if entry.file_type == "parquet":
            return sum(_parquet_rows(path) for path in entry.files)
        log.info("%s: counting its rows for num_samples", entry.where)
        return sum(1 for _ in self._rows(entry))

    def _hub_dataset(self, entry: DatasetEntry):
        import datasets

        snapshot = download_hub_snapshot(entry, self.cache_dir)
        try:
            return datasets.load_dataset(
                str(snapshot), name=entry.subset, data_dir=entry.folder, split=entry.split, streaming=True
            )
        except (ValueError, FileNotFoundError) as exc:
            raise InputError(
                f"{entry.where}: cannot open subset {entry.subset!r}, split {entry.split!r}: {exc}"
            ) from exc


def _file_dataset(entry: DatasetEntry, path: Path):
    import datasets

    return datasets.load_dataset(entry.file_type, data_files=[str(path)], split="train", streaming=True)


def _checked_rows(entry: DatasetEntry, dataset, where: str) -> Iterator[dict[str, Any]]:
    """The rows of one file (or hub split); a parse error, or a field no row has, is an InputError."""
    seen: set[str] = set()
    read = 0
    try:
        for columns in dataset.iter(batch_size=ROWS_PER_BATCH):
            seen.update(columns)
            names = list(columns)
            count = len(columns[names[0]]) if names else 0
            for i in range(count):
                yield {name: columns[name][i] for name in names}
            read += count
    except Exception as exc:  # pyarrow/json/datasets errors: the file is not what it claims
        raise InputError(f"{where}: cannot be read after row {read}: {exc}") from exc
    missing = [name for name in entry.columns.required(entry.formatting) if name not in seen]
    if missing and read:
        raise InputError(
            f"{where}: no row has the field {', '.join(map(repr, missing))} the entry reads (its fields: "
            f"{', '.join(sorted(seen))}); fix `columns` in the registry"
        )


def sample_counts(
    num_rows: int, entry: DatasetEntry, draws: np.random.RandomState, max_samples: int | None = None
) -> np.ndarray:
    """How many times each row appears when `entry.num_samples` rows are drawn from `num_rows` (and only
    the first `max_samples` of the draw are kept, as LLaMA-Factory keeps them).

    As LLaMA-Factory 0.9.3 draws them (`_load_single_dataset`): the first num_samples of a permutation
    of the rows and, when that is more than there are, uniform picks for the rest, from numpy's legacy
    generator; LLaMA-Factory seeds it with the training seed before reading any dataset and draws for
    the datasets in their order, so `draws` is RandomState(--seed) shared in the same order, and the
    rows drawn are LLaMA-Factory's for the same seed.
    """
    if num_rows == 0:
        raise InputError(f"{entry.where}: num_samples {entry.num_samples} asks for rows of an empty dataset")
    target = entry.num_samples
    indexes = draws.permutation(num_rows)[:target]
    if target > num_rows:
        indexes = np.concatenate([indexes, draws.choice(num_rows, target - num_rows)])
    return np.bincount(indexes[:max_samples], minlength=num_rows)


def _at_most(count: int, limit: int | None) -> int:
    return count if limit is None else min(count, limit)


def _resampled(rows: Iterator[dict[str, Any]], counts: np.ndarray) -> Iterator[dict[str, Any]]:
    for row, count in zip(rows, counts.tolist(), strict=True):
        for _ in range(count):
            yield row


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:
        raise InputError(f"cannot read {path} as parquet: {exc}") from exc


def download_hub_snapshot(entry: DatasetEntry, cache_dir: str | None = None) -> Path:
    """The entry's hub dataset at its revision, downloaded into the Hugging Face cache."""
    return download_dataset(
        entry.hub_repo,
        entry.revision,
        where=entry.where,
        cache_dir=cache_dir,
        fix="fix `revision` in the registry",
    )
