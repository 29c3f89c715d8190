"""The aligned parquet as the preprocessor reads it: its columns checked, its rows in record batches.

The parquet is the output of tools/get_am_dataset.py (columns `conversations`, `system`, `subset`);
only the columns the run needs are read, a batch at a time, so memory does not grow with the input.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import InputError

ROWS_PER_BATCH = 256  # one worker task: large enough to amortise the transfer, small enough to balance


@dataclass(frozen=True)
class AlignedSource:
    path: Path
    num_rows: int
    columns: tuple[str, ...]  # those read: conversations, and system / subset where present

    @classmethod
    def open(cls, path: Path, need_system_column: bool) -> AlignedSource:
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
        return cls(Path(path), parquet.metadata.num_rows, columns)

    def batches(self, rows_per_batch: int = ROWS_PER_BATCH) -> Iterator[Any]:
        """Record batches (pyarrow) of the needed columns, in file order."""
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(self.path).iter_batches(
            batch_size=rows_per_batch, columns=list(self.columns)
        )
