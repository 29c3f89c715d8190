"""tools/get_eval_data.py against the local hub server: each benchmark's dataset is fetched at its pinned
commit (only the files it reads), written with the hub's columns, filtered and counted as computed by
hand, and listed in a manifest with the commit served and the sha256 of the bytes the hub held; a wrong
revision, a gated dataset without a token and an existing output are named errors with exit status 2."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evaluation.benchmarks import read_benchmark
from evaluation.sources import HUB_SOURCES
from testing.local_hub import LocalHub

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_local_test_token"

AIME24 = [
    {"id": 60, "problem": "Find 200 + 4.", "solution": "...", "answer": "204", "url": "u60", "year": "2024"},
    {"id": 61, "problem": "Find 20 + 5.", "solution": "...", "answer": "025", "url": "u61", "year": "2024"},
]
AIME25 = [{"problem_idx": 1, "problem": "Find 70.", "answer": "70"}]
HMMT25 = [{"problem_idx": 1, "problem": "Find one half.", "answer": "\\frac{1}{2}"}]
MATH500 = [
    {
        "problem": "What is 1+1?",
        "solution": "2",
        "answer": "2",
        "subject": "Algebra",
        "level": 1,
        "unique_id": "test/algebra/1.json",
    },
]
OMNI = [  # difficulty 9 and above is kept; an empty gold answer could never be graded
    {
        "domain": ["Algebra"],
        "difficulty": 9.0,
        "problem": "Hard one.",
        "solution": "",
        "answer": "3",
        "source": "imo",
    },
    {
        "domain": ["Algebra"],
        "difficulty": 8.5,
        "problem": "Easier.",
        "solution": "",
        "answer": "4",
        "source": "usamo",
    },
    {
        "domain": ["Algebra"],
        "difficulty": 10.0,
        "problem": "Hardest.",
        "solution": "",
        "answer": "x+1",
        "source": "imo",
    },
    {
        "domain": ["Algebra"],
        "difficulty": 9.5,
        "problem": "A proof.",
        "solution": "",
        "answer": "",
        "source": "imo",
    },
    {
        "domain": ["Algebra"],
        "difficulty": 2.0,
        "problem": "Easy.",
        "solution": "",
        "answer": "1",
        "source": "amc",
    },
]
GPQA_COLUMNS = [
    "Question",
    "Correct Answer",
    "Incorrect Answer 1",
    "Incorrect Answer 2",
    "Incorrect Answer 3",
    "Explanation",
    "Record ID",
]
GPQA = [
    ["Which gas do plants take in?", "carbon dioxide", "helium", "neon", "argon", "photosynthesis", "rec1"]
]


def _parquet(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _csv(columns: list[str], rows: list[list[str]]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(columns)
    writer.writerows(rows)
    return text.getvalue().encode()


# Each repository as its dataset lays it out: the files the tool reads, and others it must leave alone.
REPOS = {
    "aime24": {"data/train-00000-of-00001.parquet": _parquet(AIME24), "README.md": b"# AIME 2024\n"},
    "aime25": {"data/train-00000-of-00001.parquet": _parquet(AIME25)},
    "hmmt25": {"data/train-00000-of-00001.parquet": _parquet(HMMT25)},
    "math500": {"test.jsonl": _jsonl(MATH500), "README.md": b"# MATH-500\n"},
    "omni_math_hard": {"test.jsonl": _jsonl(OMNI)},
    "gpqa_diamond": {
        "gpqa_diamond.csv": _csv(GPQA_COLUMNS, GPQA),
        "gpqa_main.csv": _csv(GPQA_COLUMNS, GPQA * 3),
    },
}


@pytest.fixture
def hub():
    """Every benchmark's dataset at its pinned commit; GPQA gated behind TOKEN."""
    first, *rest = HUB_SOURCES.values()
    with LocalHub(first.repo, REPOS[first.benchmark], first.revision) as server:
        for source in rest:
            server.add(
                source.repo, REPOS[source.benchmark], source.revision, token=TOKEN if source.gated else None
            )
        yield server


def _get(hub: LocalHub, tmp_path: Path, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    # A subprocess, as for a user: huggingface_hub reads HF_ENDPOINT and HF_TOKEN when it is imported.
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        env.pop(name, None)
    if token is not None:
        env["HF_TOKEN"] = token
    cmd = [sys.executable, str(ROOT / "tools" / "get_eval_data.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_benchmark_at_its_pinned_commit_with_a_manifest(hub, tmp_path):
    out = tmp_path / "eval-data"
    done = _get(hub, tmp_path, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]

    # The hub's rows and columns, kept as they are (AIME's zero-padded "025" stays a string) ...
    assert _lines(out / "aime24.jsonl") == AIME24
    assert _lines(out / "aime25.jsonl") == AIME25
    assert _lines(out / "hmmt25.jsonl") == HMMT25
    assert _lines(out / "math500.jsonl") == MATH500
    # ... Omni-MATH-HARD: difficulty >= 9 with a gradable answer: rows 0 and 2 of 5.
    assert _lines(out / "omni_math_hard.jsonl") == [OMNI[0], OMNI[2]]
    assert _lines(out / "gpqa_diamond.jsonl") == [dict(zip(GPQA_COLUMNS, GPQA[0], strict=True))]

    manifest = json.loads((out / "manifest.json").read_text())["benchmarks"]
    assert sorted(manifest) == sorted(HUB_SOURCES)
    for name, source in HUB_SOURCES.items():
        entry = manifest[name]
        assert (entry["repo"], entry["revision"], entry["commit"]) == (
            source.repo,
            source.revision,
            source.revision,
        )
        read = {
            path: data
            for path, data in REPOS[name].items()
            if path.endswith((".parquet", ".jsonl", "diamond.csv"))
        }
        assert entry["source_files"] == [
            {"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for path, data in sorted(read.items())
        ]
        assert entry["sha256"] == hashlib.sha256((out / f"{name}.jsonl").read_bytes()).hexdigest()
    assert (manifest["omni_math_hard"]["rows_read"], manifest["omni_math_hard"]["rows_written"]) == (5, 2)
    assert manifest["omni_math_hard"]["dropped"] == {
        "difficulty below 9": 2,
        "no gold answer math-verify can read": 1,
    }
    assert manifest["aime24"]["dropped"] == {} and manifest["aime24"]["problems"] == 2

    # Only the files each benchmark reads were fetched, each from its pinned commit.
    fetched = {path for method, path in hub.requests if method == "GET" and "/resolve/" in path}
    assert (
        f"/datasets/Idavidrein/gpqa/resolve/{HUB_SOURCES['gpqa_diamond'].revision}/gpqa_diamond.csv"
        in fetched
    )
    assert not any(path.endswith(("gpqa_main.csv", "README.md")) for path in fetched)
    # What tools/evaluate.py reads from the directory.
    assert [p.id for p in read_benchmark(out, "omni_math_hard")] == ["0", "1"]
    assert [p.gold for p in read_benchmark(out, "aime24")] == ["204", "025"]

    # A second run adds to the manifest: an existing file needs --force, the other entries stay.
    done = _get(hub, tmp_path, "--out", str(out), "--benchmarks", "aime25")
    assert done.returncode == 2 and "aime25" in done.stderr and "--force" in done.stderr
    done = _get(
        hub,
        tmp_path,
        "--out",
        str(out),
        "--benchmarks",
        "omni_math_hard",
        "--omni-min-difficulty",
        "10",
        "--force",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _lines(out / "omni_math_hard.jsonl") == [OMNI[2]]
    assert sorted(json.loads((out / "manifest.json").read_text())["benchmarks"]) == sorted(HUB_SOURCES)


def test_a_wrong_revision_or_a_missing_token_is_a_named_error(hub, tmp_path):
    wrong = "0" * 40
    done = _get(
        hub, tmp_path, "--out", str(tmp_path / "a"), "--benchmarks", "aime25", "--revision", f"aime25={wrong}"
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"no revision {wrong} of the dataset MathArena/aime_2025" in done.stderr
    assert "--revision aime25=COMMIT" in done.stderr
    assert not (tmp_path / "a" / "aime25.jsonl").exists()

    done = _get(hub, tmp_path, "--out", str(tmp_path / "b"), "--benchmarks", "gpqa_diamond", token=None)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Idavidrein/gpqa is gated" in done.stderr and "HF_TOKEN" in done.stderr
    assert not (tmp_path / "b" / "gpqa_diamond.jsonl").exists()

    done = _get(hub, tmp_path, "--out", str(tmp_path / "c"), "--benchmarks", "aime24,nope")
    assert done.returncode == 2 and "unknown benchmark 'nope'" in done.stderr
    done = _get(
        hub, tmp_path, "--out", str(tmp_path / "c"), "--benchmarks", "aime24", "--revision", "aime25=abc"
    )
    assert done.returncode == 2 and "'aime25' is not in --benchmarks" in done.stderr
