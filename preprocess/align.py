"""Aligns the AM-Thinking-v1-Distilled subsets into one parquet with a fixed schema.

The six subset files of the dataset have different schemas (extra and nested per-subset fields, an
optional top-level `system`), so `datasets.load_dataset` cannot read them as one table. This module
streams every jsonl/parquet file of a snapshot row by row, validates each conversation with the rule
of `preprocess.conversation`, and writes

    conversations: list<struct<from: string, value: string>>,  system: string,  subset: string

with rows in file order (files sorted by path). Memory stays bounded by one write batch. Every dropped
row is counted under its reason; a file that cannot be read at all is an error naming it.
Entry point: tools/get_am_dataset.py.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import DataError, InputError
from common.files import atomic_output, file_fingerprint, write_json_atomic
from common.hub import download_dataset

from . import conversation

log = logging.getLogger(__name__)

AM_THINKING_REPO = "a-m-team/AM-Thinking-v1-Distilled"
AM_THINKING_REVISION = "3697c1829816a2b8d4d25995ed6d5d27ffb49b30"
DATA_SUFFIXES = (".jsonl", ".parquet")
_FLUSH_ROWS = 1024
_FLUSH_BYTES = 64 << 20


def aligned_schema():
    import pyarrow as pa

    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    return pa.schema([("conversations", pa.list_(turn)), ("system", pa.string()), ("subset", pa.string())])


@dataclass
class AlignSummary:
    kept_per_subset: Counter = field(default_factory=Counter)
    dropped_per_reason: Counter = field(default_factory=Counter)
    dropped_per_subset: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)  # kept rows with something worth knowing
    sources: list = field(default_factory=list)

    @property
    def kept(self) -> int:
        return sum(self.kept_per_subset.values())

    @property
    def dropped(self) -> int:
        return sum(self.dropped_per_reason.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_kept": self.kept,
            "rows_dropped": self.dropped,
            "kept_per_subset": dict(sorted(self.kept_per_subset.items())),
            "dropped_per_subset": dict(sorted(self.dropped_per_subset.items())),
            "dropped_per_reason": {
                r: self.dropped_per_reason[r] for r in conversation.DROP_REASONS if self.dropped_per_reason[r]
            },
            "notes": dict(self.notes),
            "sources": self.sources,
        }

    def report(self) -> str:
        lines = [f"kept {self.kept} rows, dropped {self.dropped}"]
        lines += [f"  kept    {name:<24} {n:>10}" for name, n in sorted(self.kept_per_subset.items())]
        lines += [
            f"  dropped {r:<24} {self.dropped_per_reason[r]:>10}"
            for r in conversation.DROP_REASONS
            if self.dropped_per_reason[r]
        ]
        lines += [f"  note    {k:<24} {v:>10}" for k, v in sorted(self.notes.items())]
        return "\n".join(lines)


def find_data_files(source: Path) -> list[Path]:
    """The snapshot's jsonl/parquet files, sorted by relative path; anything else is listed and skipped."""
    if not source.is_dir():
        raise InputError(f"--source {source} is not a directory (expected a local snapshot of the dataset)")
    files = sorted(
        p
        for p in source.rglob("*")
        if p.is_file() and not any(s.startswith(".") for s in p.relative_to(source).parts)
    )
    data = [p for p in files if p.suffix in DATA_SUFFIXES]
    skipped = [str(p.relative_to(source)) for p in files if p.suffix not in DATA_SUFFIXES]
    if skipped:
        log.info("skipping %d non-data files: %s", len(skipped), ", ".join(skipped[:10]))
    if not data:
        raise InputError(f"{source} holds no .jsonl or .parquet files")
    return data


def subset_name(path: Path, source: Path) -> str:
    return str(path.relative_to(source).with_suffix(""))


def download_snapshot(revision: str, cache_dir: str | None = None, repo: str = AM_THINKING_REPO) -> Path:
    """Downloads the dataset's data files at a pinned revision (HF cache) and returns the local snapshot.

    The hub files are then read by the same streaming reader as a local snapshot: reading them through
    `datasets.load_dataset` is exactly what fails on this dataset's per-subset schemas.
    """
    return download_dataset(
        repo,
        revision,
        allow_patterns=[f"*{s}" for s in DATA_SUFFIXES],
        cache_dir=cache_dir,
        fix=f"check --revision (default: the recipe's {AM_THINKING_REVISION})",
        offline="download on a machine with access and pass --source SNAPSHOT_DIR",
    )


def iter_jsonl(path: Path, progress) -> Iterator[tuple[Any, str | None]]:
    """(row, None) for each parsed line, or (None, reason) for a line that cannot be a row."""
    with open(path, "rb") as f:
        for raw in f:
            progress.update(len(raw))
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield None, conversation.UNDECODABLE_BYTES
                continue
            try:
                yield json.loads(text), None
            except json.JSONDecodeError:
                yield None, conversation.BROKEN_JSONL_LINE


def iter_parquet(path: Path, progress) -> Iterator[tuple[Any, str | None]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    wanted = [c for c in ("conversations", "system") if c in parquet.schema_arrow.names]
    for batch in parquet.iter_batches(batch_size=256, columns=wanted):
        for row in batch.to_pylist():
            progress.update(1)
            yield row, None


def align_row(row: Any, subset: str, summary: AlignSummary) -> dict[str, Any] | None:
    """The aligned record for one source row, or None (counted) when the row is invalid."""
    if not isinstance(row, dict):
        return _drop(summary, subset, conversation.NOT_AN_OBJECT)
    conversations = row.get("conversations")
    problem = conversation.conversation_problem(conversations)
    if problem:
        return _drop(summary, subset, problem)
    system = row.get("system")
    if system is None:
        system = ""
    elif not isinstance(system, str) or not conversation.is_encodable(system):
        summary.notes["top_level_system_unusable_set_empty"] += 1
        system = ""
    summary.kept_per_subset[subset] += 1
    turns = [{"from": t["from"], "value": t["value"]} for t in conversations]
    return {"conversations": turns, "system": system, "subset": subset}


def _drop(summary: AlignSummary, subset: str, reason: str) -> None:
    summary.dropped_per_reason[reason] += 1
    summary.dropped_per_subset[subset] += 1
    return None


def align_snapshot(source: Path, output: Path, revision: str | None = None) -> AlignSummary:
    """Streams every data file under `source` into the aligned parquet `output` (written atomically)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    files = find_data_files(source)
    summary = AlignSummary()
    schema = aligned_schema()
    with atomic_output(output) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            buffer: list[dict[str, Any]] = []
            buffered_bytes = 0
            for path in files:
                subset = subset_name(path, source)
                summary.sources.append(
                    {**file_fingerprint(path), "path": str(path.relative_to(source)), "subset": subset}
                )
                reader, total, unit = _reader_for(path)
                with tqdm(
                    total=total, unit=unit, unit_scale=True, desc=f"align {subset}", leave=False
                ) as bar:
                    try:
                        for row, reason in reader(path, bar):
                            if reason:
                                _drop(summary, subset, reason)
                                continue
                            record = align_row(row, subset, summary)
                            if record is None:
                                continue
                            buffer.append(record)
                            buffered_bytes += sum(len(t["value"]) for t in record["conversations"])
                            if len(buffer) >= _FLUSH_ROWS or buffered_bytes >= _FLUSH_BYTES:
                                writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
                                buffer, buffered_bytes = [], 0
                    except (OSError, pa.ArrowException) as exc:
                        raise InputError(f"cannot read {path}: {exc}") from exc
                log.info(
                    "%s: kept %d, dropped %d",
                    subset,
                    summary.kept_per_subset[subset],
                    summary.dropped_per_subset[subset],
                )
            if buffer:
                writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
            if summary.kept == 0:  # raised inside atomic_output: nothing is written
                raise DataError(_nothing_kept(source, files, summary))
    result = summary.to_dict()
    result["revision"] = revision
    write_json_atomic(summary_path(output), result)
    return summary


def _nothing_kept(source: Path, files: list[Path], summary: AlignSummary) -> str:
    reasons = ", ".join(f"{reason} {count}" for reason, count in summary.dropped_per_reason.most_common())
    return (
        f"{source}: no usable conversation in {len(files)} data file(s); every one of the "
        f"{summary.dropped} rows was dropped ({reasons or 'no rows at all'}): is this a snapshot of "
        "AM-Thinking-v1-Distilled (rows with conversations of human/gpt turns, or messages)?"
    )


def summary_path(output: Path) -> Path:
    return output.with_suffix(".summary.json")


def _reader_for(path: Path):
    if path.suffix == ".jsonl":
        return iter_jsonl, path.stat().st_size, "B"
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # pyarrow raises several types for a corrupt footer
        raise InputError(f"cannot read {path}: not a valid parquet file ({exc})") from exc
    return iter_parquet, rows, "row"
