"""The benchmarks K2-Think reports, and reading their problems from a local data directory.

    problems = read_benchmark(Path("eval-data"), "aime24")     # [Problem(id="60", text=..., gold="204")]

A data directory holds one file per benchmark, `NAME.jsonl` or `NAME.parquet`, with the hub dataset's
own columns: `problem` and `answer` for the math sets, GPQA's `Question`, `Correct Answer` and
`Incorrect Answer 1..3`; an `id`, `unique_id`, `problem_idx` or `Record ID` column names each
problem, else its row number. A file of any other name with `problem` and `answer` columns is a math
set of the user's own, graded as the math benchmarks are. GPQA's options are put in an order drawn
from the seed and the question, so that the right letter is spread over A-D and the same seed gives
the same order.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.errors import InputError

CHOICE_LETTERS = "ABCD"
_GPQA_OPTIONS = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
_ID_COLUMNS = ("id", "unique_id", "problem_idx", "Record ID")


@dataclass(frozen=True)
class Benchmark:
    name: str  # as --benchmarks names it, and the data file's stem
    title: str
    kind: Literal["math", "choice"]  # graded by math-verify, or by the option letter


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark("aime24", "AIME 2024", "math"),
        Benchmark("aime25", "AIME 2025", "math"),
        Benchmark("hmmt25", "HMMT February 2025", "math"),
        Benchmark("math500", "MATH-500", "math"),
        Benchmark("omni_math_hard", "Omni-MATH-HARD", "math"),
        Benchmark("gpqa_diamond", "GPQA-Diamond", "choice"),
    )
}


@dataclass(frozen=True)
class Problem:
    """One problem as the model sees it (before the profile's suffix) and its gold answer."""

    id: str
    text: str
    gold: str  # the answer, or for a multiple-choice question its option letter


def benchmark_named(name: str, data_dir: Path | None = None) -> Benchmark:
    """The registry's benchmark `name`, or a math set of the user's own if `data_dir` has its file."""
    if name in BENCHMARKS:
        return BENCHMARKS[name]
    if data_dir is not None and data_dir.is_dir() and _files_of(data_dir, name):
        return benchmark_of(name)
    raise InputError(
        f"unknown benchmark {name!r}; the benchmarks are: {', '.join(BENCHMARKS)} (or a math set of your "
        f"own: {name}.jsonl with `problem` and `answer` columns in the data directory)"
    )


def benchmark_of(name: str) -> Benchmark:
    """The registry's benchmark, else a math set of the user's own (checked by `benchmark_named`)."""
    return BENCHMARKS.get(name) or Benchmark(name, name, "math")


def benchmark_file(data_dir: Path, name: str) -> Path:
    """`data_dir/NAME.jsonl` or `data_dir/NAME.parquet`, whichever exists (not both)."""
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: no such data directory (tools/get_eval_data.py --out DIR writes one)")
    found = _files_of(data_dir, name)
    if not found:
        raise InputError(
            f"{data_dir} holds no {name}.jsonl or {name}.parquet: add the benchmark's file (the hub "
            "dataset's own columns) or leave it out of --benchmarks"
        )
    if len(found) > 1:
        raise InputError(f"{data_dir} holds both {found[0].name} and {found[1].name}: keep one")
    return found[0]


def benchmarks_in(data_dir: Path) -> list[str]:
    """The benchmarks that have a file in `data_dir`, in registry order."""
    return [name for name in BENCHMARKS if _files_of(data_dir, name)]


def _files_of(data_dir: Path, name: str) -> list[Path]:
    return [
        data_dir / f"{name}.{ext}" for ext in ("jsonl", "parquet") if (data_dir / f"{name}.{ext}").is_file()
    ]


def read_benchmark(data_dir: Path, name: str, seed: int = 0) -> list[Problem]:
    """The problems of benchmark `name` in `data_dir`, in file order."""
    benchmark = benchmark_named(name, data_dir)
    path = benchmark_file(data_dir, name)
    rows = read_rows(path)
    if not rows:
        raise InputError(f"{path} holds no rows")
    read = _choice_problem if benchmark.kind == "choice" else _math_problem
    problems = [read(path, number, row, seed) for number, row in enumerate(rows)]
    first_row: dict[str, int] = {}
    for number, problem in enumerate(problems):
        if problem.id in first_row:  # scores and samples are kept per problem id
            raise InputError(f"{path}, row {number}: id {problem.id!r} again (row {first_row[problem.id]})")
        first_row[problem.id] = number
    return problems


def read_rows(path: Path) -> list[dict]:
    """The rows of a parquet, CSV (a header line) or JSON-lines file, as dicts of its columns."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        import csv

        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}, line {number + 1}: not JSON ({exc})") from None
    return rows


def _field(path: Path, number: int, row: dict, column: str) -> str:
    value = row.get(column)
    if value is None or not str(value).strip():
        present = ", ".join(row) or "none"
        raise InputError(
            f"{path}, row {number}: no {column!r} (columns: {present}); use the hub dataset's columns"
        )
    return str(value).strip()


def _problem_id(row: dict, number: int) -> str:
    return next((str(row[c]) for c in _ID_COLUMNS if row.get(c) is not None), str(number))


def _math_problem(path: Path, number: int, row: dict, seed: int) -> Problem:
    return Problem(
        _problem_id(row, number), _field(path, number, row, "problem"), _field(path, number, row, "answer")
    )


def _choice_problem(path: Path, number: int, row: dict, seed: int) -> Problem:
    question = _field(path, number, row, "Question")
    options = [_field(path, number, row, column) for column in _GPQA_OPTIONS]
    order = list(range(len(options)))
    random.Random(f"{seed}:{question}").shuffle(order)  # str seeds are hashed deterministically (sha512)
    lines = [f"{letter}) {options[i]}" for letter, i in zip(CHOICE_LETTERS, order, strict=True)]
    gold = CHOICE_LETTERS[order.index(0)]  # where the correct answer landed
    return Problem(_problem_id(row, number), question + "\n\n" + "\n".join(lines), gold)
