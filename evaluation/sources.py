"""Where each benchmark comes from on the Hugging Face Hub, and writing a data directory from there
(tools/get_eval_data.py).

    entry = fetch_benchmark(HUB_SOURCES["aime24"], Path("eval-data"))   # eval-data/aime24.jsonl
    write_manifest(Path("eval-data"), {"aime24": entry})

Each source is one dataset at a pinned commit, the glob of its data files there, and what is kept of
its rows: every row with a gold answer math-verify can read (a row it cannot read would be scored zero
for every reply), and for Omni-MATH-HARD only the problems of difficulty `min_difficulty` and above on
Omni-MATH's own scale. The rows keep the hub's columns, one JSON object per line in `NAME.jsonl`, which is
what `evaluation.benchmarks` reads; GPQA's options are shuffled there, at evaluation, with its seed. The
manifest records, per benchmark, the revision asked for and the commit served, each source file's
sha256 and size, the rows read, written and dropped by reason, and the written file's sha256.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.errors import InputError
from common.files import atomic_output, write_json_atomic
from common.hub import download_dataset

from .benchmarks import BENCHMARKS, read_benchmark, read_rows
from .grading import gold_is_readable

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
OMNI_MATH_HARD_MIN_DIFFICULTY = 9.0


@dataclass(frozen=True)
class HubSource:
    """One benchmark's dataset on the hub and what of it is kept."""

    benchmark: str  # a key of evaluation.benchmarks.BENCHMARKS: the output is NAME.jsonl
    repo: str
    revision: str  # the pinned commit
    files: str  # glob of the data files in the repository (huggingface_hub's allow_patterns syntax)
    rows: int | None = None  # how many rows the pinned commit holds (a check, logged when it differs)
    gated: bool = False  # terms to accept on the hub, and a token (HF_TOKEN)
    min_difficulty: float | None = None  # keep rows whose `difficulty` is at least this

    def describe_filter(self) -> str:
        kept = "rows whose gold answer math-verify reads" if self.kind == "math" else "every row"
        if self.min_difficulty is not None:
            kept += f", of difficulty >= {self.min_difficulty:g}"
        return kept

    @property
    def kind(self) -> str:
        return BENCHMARKS[self.benchmark].kind


HUB_SOURCES = {
    s.benchmark: s
    for s in (
        HubSource(
            "aime24",
            "HuggingFaceH4/aime_2024",
            "2fe88a2f1091d5048c0f36abc874fb997b3dd99a",
            "data/train-*.parquet",
            rows=30,
        ),
        HubSource(
            "aime25",
            "MathArena/aime_2025",
            "c94da77eb22bbd6439e62a323bec18493a421302",
            "data/train-*.parquet",
            rows=30,
        ),
        HubSource(
            "hmmt25",
            "MathArena/hmmt_feb_2025",
            "6fdc4277120810ff75aa22d2d5489b91f7a262a1",
            "data/train-*.parquet",
            rows=30,
        ),
        HubSource(
            "math500",
            "HuggingFaceH4/MATH-500",
            "ff5b20257d8185524591543f8ff5993951537bb8",
            "test.jsonl",
            rows=500,
        ),
        HubSource(
            "omni_math_hard",
            "KbsdJames/Omni-MATH",
            "0000b6bc8be4aa61655413073c3645ae4b3b30e8",
            "test.jsonl",
            rows=4428,
            min_difficulty=OMNI_MATH_HARD_MIN_DIFFICULTY,
        ),
        HubSource(
            "gpqa_diamond",
            "Idavidrein/gpqa",
            "633f5ee89ab8ad4522a9f850766b73f62147ffdd",
            "gpqa_diamond.csv",
            rows=198,
            gated=True,
        ),
    )
}


def source_for(benchmark: str, revision: str | None = None, min_difficulty: float | None = None) -> HubSource:
    """The registry's source of `benchmark`, at `revision` instead of the pinned one if given, and for
    Omni-MATH-HARD with another difficulty floor if given."""
    if benchmark not in HUB_SOURCES:
        raise InputError(f"unknown benchmark {benchmark!r}; the benchmarks are: {', '.join(HUB_SOURCES)}")
    source = HUB_SOURCES[benchmark]
    if revision is not None:
        source = replace(source, revision=revision, rows=None)
    if min_difficulty is not None and source.min_difficulty is not None:
        source = replace(source, min_difficulty=min_difficulty)
    return source


def fetch_benchmark(source: HubSource, out_dir: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """Downloads `source`, writes out_dir/NAME.jsonl (atomically) and returns its manifest entry."""
    where = f"{source.benchmark} ({source.repo}@{source.revision})"
    snapshot = download_dataset(
        source.repo,
        source.revision,
        where=where,
        fix=f"pass --revision {source.benchmark}=COMMIT with a commit of the dataset's history",
        allow_patterns=[source.files],
        cache_dir=cache_dir,
    )
    files = sorted(
        p for p in snapshot.rglob("*") if p.is_file() and fnmatch.fnmatch(_in_repo(p, snapshot), source.files)
    )
    if not files:
        raise InputError(
            f"{where}: no file matches {source.files!r} there (the dataset's layout changed?): pass "
            f"--revision {source.benchmark}=COMMIT of the layout this tool reads"
        )
    rows = [row for path in files for row in read_rows(path)]
    if source.rows is not None and len(rows) != source.rows:
        log.warning("%s: %d rows, where the pinned commit has %d", where, len(rows), source.rows)
    kept, dropped = _keep(source, rows)
    output = out_dir / f"{source.benchmark}.jsonl"
    with atomic_output(output) as tmp:
        lines = (json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in kept)
        tmp.write_text("".join(lines), "utf-8")
    problems = read_benchmark(out_dir, source.benchmark)  # what tools/evaluate.py will read, or its error
    return {
        "repo": source.repo,
        "revision": source.revision,
        "commit": snapshot.name,  # the snapshot directory of the HF cache is named by the commit served
        "source_files": [
            {"path": _in_repo(p, snapshot), "bytes": p.stat().st_size, "sha256": _sha256(p.read_bytes())}
            for p in files
        ],
        "kept": source.describe_filter(),
        "rows_read": len(rows),
        "rows_written": len(kept),
        "dropped": dict(sorted(dropped.items())),
        "problems": len(problems),
        "file": output.name,
        "sha256": _sha256(output.read_bytes()),
    }


def write_manifest(out_dir: Path, entries: dict[str, dict[str, Any]], tool: dict[str, Any]) -> Path:
    """Adds `entries` to out_dir/manifest.json (created if missing; other benchmarks' entries kept)."""
    path = out_dir / MANIFEST
    manifest = json.loads(path.read_text("utf-8")) if path.is_file() else {"benchmarks": {}}
    manifest["tool"] = tool
    manifest["benchmarks"].update(entries)
    manifest["benchmarks"] = dict(sorted(manifest["benchmarks"].items()))
    write_json_atomic(path, manifest)
    return path


def _keep(source: HubSource, rows: list[dict]) -> tuple[list[dict], Counter]:
    kept, dropped = [], Counter()
    for row in rows:
        reason = _drop_reason(source, row)
        if reason is None:
            kept.append(row)
        else:
            dropped[reason] += 1
    return kept, dropped


def _drop_reason(source: HubSource, row: dict) -> str | None:
    if source.min_difficulty is not None:
        difficulty = row.get("difficulty")
        if difficulty is None:
            return "no difficulty"
        if float(difficulty) < source.min_difficulty:
            return f"difficulty below {source.min_difficulty:g}"
    if source.kind == "math" and not gold_is_readable(str(row.get("answer") or "")):
        return "no gold answer math-verify can read"
    return None


def _in_repo(path: Path, snapshot: Path) -> str:
    return path.relative_to(snapshot).as_posix()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
