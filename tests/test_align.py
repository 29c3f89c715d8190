"""The aligner on the synthetic snapshot: rows kept per subset, malformed rows counted under the
reason planted in the fixture, the fixed output schema, and errors for unreadable inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from common.errors import InputError
from preprocess import conversation
from preprocess.align import align_snapshot, aligned_schema, summary_path

ROOT = Path(__file__).resolve().parents[1]


def test_counts_match_the_planted_rows(sample_snapshot, aligned_parquet):
    summary = json.loads(summary_path(aligned_parquet).read_text())
    assert summary["kept_per_subset"] == dict(sorted(sample_snapshot.kept_per_subset.items()))
    assert summary["dropped_per_reason"] == {r: n for r, n in sample_snapshot.dropped_per_reason.items() if n}
    assert summary["rows_kept"] == sample_snapshot.kept == 300
    # Every drop reason the issue names is exercised by the fixture.
    assert set(summary["dropped_per_reason"]) >= {
        conversation.MISSING_CONVERSATIONS,
        conversation.EMPTY_CONVERSATIONS,
        conversation.UNKNOWN_ROLE,
        conversation.ROLES_OUT_OF_ORDER,
        conversation.NON_STRING_VALUE,
        conversation.UNDECODABLE_BYTES,
        conversation.BROKEN_JSONL_LINE,
    }
    assert len(summary["sources"]) == 6 and all("sha256" in s for s in summary["sources"])


def test_output_schema_and_content(aligned_parquet, sample_snapshot):
    table = pq.read_table(aligned_parquet)
    assert table.schema.equals(aligned_schema(), check_metadata=False)
    rows = table.to_pylist()
    assert Counter(r["subset"] for r in rows) == sample_snapshot.kept_per_subset
    for row in rows:
        assert conversation.conversation_problem(row["conversations"]) is None
        assert set(row["conversations"][0]) == {"from", "value"}  # nested per-subset fields are gone
        assert isinstance(row["system"], str)
    science = [r for r in rows if r["subset"] == "science"]
    assert sum(r["system"] == "You are a careful scientist." for r in science) == 17  # i % 3 == 0 of 50
    multiturn = [r for r in rows if r["subset"] == "multiturn"]
    assert sum(r["conversations"][0]["from"] == "system" for r in multiturn) == 25
    assert any(len(r["conversations"]) >= 7 for r in multiturn)
    assert any("设" in t["value"] for r in rows for t in r["conversations"])  # non-ASCII survives


def test_valid_conversation_rule():
    h, a, s = ({"from": role, "value": "x"} for role in ("human", "assistant", "system"))
    assert conversation.conversation_problem([h, a]) is None
    assert conversation.conversation_problem([s, h, a, h, a]) is None
    assert conversation.conversation_problem([s, h]) == conversation.ROLES_OUT_OF_ORDER
    assert conversation.conversation_problem([s]) == conversation.ROLES_OUT_OF_ORDER
    assert conversation.conversation_problem([h, a, h]) == conversation.ROLES_OUT_OF_ORDER
    assert conversation.conversation_problem([h, s, a]) == conversation.ROLES_OUT_OF_ORDER
    assert conversation.conversation_problem([{"from": "user", "value": "x"}, a]) == conversation.UNKNOWN_ROLE
    assert (
        conversation.conversation_problem([h, {"from": "assistant", "value": ["x"]}])
        == conversation.NON_STRING_VALUE
    )
    assert conversation.conversation_problem([h, {"from": "assistant"}]) == conversation.MALFORMED_TURN
    assert conversation.conversation_problem("not a list") == conversation.MALFORMED_TURN
    assert conversation.conversation_problem([]) == conversation.EMPTY_CONVERSATIONS
    assert conversation.conversation_problem(None) == conversation.MISSING_CONVERSATIONS
    assert (
        conversation.conversation_problem([{"from": "human", "value": "\ud800"}, a])
        == conversation.UNDECODABLE_BYTES
    )
    assert (
        conversation.conversation_problem([{"from": "human", "value": ""}, a]) is None
    )  # empty text is accepted


def test_deterministic_output(sample_snapshot, aligned_parquet, tmp_path):
    again = tmp_path / "again.parquet"
    align_snapshot(sample_snapshot.root, again)
    assert pq.read_table(again).equals(pq.read_table(aligned_parquet))


def test_unreadable_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "good.jsonl").write_text(
        '{"conversations": [{"from": "human", "value": "q"}, {"from": "assistant", "value": "a"}]}\n'
    )
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    out = tmp_path / "out" / "aligned.parquet"
    with pytest.raises(InputError, match="broken.parquet"):
        align_snapshot(tmp_path, out)
    assert not out.exists() and not list((tmp_path / "out").glob("*.partial"))  # nothing half-written


def test_empty_or_missing_source(tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        align_snapshot(tmp_path / "nope", tmp_path / "o.parquet")
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(InputError, match="no .jsonl or .parquet"):
        align_snapshot(tmp_path, tmp_path / "o.parquet")


def test_a_source_with_no_usable_row_is_an_error_naming_the_drop_reasons(tmp_path, capsys):
    from tools_runner import run_tool

    source = tmp_path / "snapshot"
    source.mkdir()
    (source / "all_bad.jsonl").write_text(
        '{"conversations": []}\n'  # empty conversations
        '{"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}\n'
        "{not json\n"
        '{"conversations": [{"from": "human", "value": "q2"}, {"from": "dragon", "value": "b"}]}\n'
    )
    out = tmp_path / "out" / "aligned.parquet"
    assert run_tool("get_am_dataset", ["--source", str(source), str(out)]) == 2
    error = capsys.readouterr().err
    assert "no usable conversation in 1 data file(s)" in error and "every one of the 4 rows" in error
    assert "unknown_role 2" in error and "empty_conversations 1" in error and "broken_jsonl_line 1" in error
    assert not out.exists() and not summary_path(out).exists() and not list(out.parent.glob("*.partial"))


def test_cli_refuses_to_overwrite(sample_snapshot, tmp_path, capsys):
    from tools_runner import run_tool

    out = tmp_path / "a.parquet"
    out.write_text("precious")
    assert run_tool("get_am_dataset", ["--source", str(sample_snapshot.root), str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == "precious"
    run_tool("get_am_dataset", ["--source", str(sample_snapshot.root), str(out), "--force"])
    assert pq.read_metadata(out).num_rows == 300
    assert "kept 300 rows, dropped 15" in capsys.readouterr().out


def _get_from_hub(hub, out, cache, *extra: str) -> subprocess.CompletedProcess:
    """tools/get_am_dataset.py without --source, pointed at `hub` (a separate process, so that
    huggingface_hub reads HF_ENDPOINT at import as it does for a user)."""
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "get_am_dataset.py"),
        str(out),
        "--cache-dir",
        str(cache),
        *extra,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_hub_download_at_the_pinned_revision_equals_the_local_snapshot(
    sample_snapshot, aligned_parquet, tmp_path
):
    from preprocess.align import AM_THINKING_REPO, AM_THINKING_REVISION
    from testing.local_hub import LocalHub

    with LocalHub.from_directory(AM_THINKING_REPO, sample_snapshot.root, AM_THINKING_REVISION) as hub:
        done = _get_from_hub(hub, tmp_path / "hub.parquet", tmp_path / "cache")
        assert done.returncode == 0, done.stderr[-3000:]
        # The pinned commit was asked for by name, every data file fetched from it.
        files = sorted(p.name for p in sample_snapshot.root.iterdir())
        assert ("GET", f"/api/datasets/{AM_THINKING_REPO}/tree/{AM_THINKING_REVISION}") in hub.requests
        fetched = sorted(
            path.rsplit("/", 1)[1]
            for method, path in hub.requests
            if method == "GET" and f"/resolve/{AM_THINKING_REVISION}/" in path
        )
        assert fetched == files

    snapshot = (
        tmp_path
        / "cache"
        / "datasets--a-m-team--AM-Thinking-v1-Distilled"
        / "snapshots"
        / AM_THINKING_REVISION
    )
    assert sorted(p.name for p in snapshot.iterdir()) == files
    for name in files:  # in the cache, byte for byte
        assert (snapshot / name).read_bytes() == (sample_snapshot.root / name).read_bytes()
    assert pq.read_table(tmp_path / "hub.parquet").equals(pq.read_table(aligned_parquet))
    summary = json.loads(summary_path(tmp_path / "hub.parquet").read_text())
    local = json.loads(summary_path(aligned_parquet).read_text())
    assert summary["revision"] == AM_THINKING_REVISION and summary["rows_kept"] == 300
    assert {k: v for k, v in summary.items() if k not in ("revision", "sources")} == {
        k: v for k, v in local.items() if k not in ("revision", "sources")
    }


def test_hub_errors_name_the_revision_and_the_missing_file(sample_snapshot, tmp_path):
    from preprocess.align import AM_THINKING_REPO, AM_THINKING_REVISION
    from testing.local_hub import LocalHub

    with LocalHub.from_directory(AM_THINKING_REPO, sample_snapshot.root, AM_THINKING_REVISION) as hub:
        wrong = "0" * 40
        done = _get_from_hub(hub, tmp_path / "a.parquet", tmp_path / "cache", "--revision", wrong)
        assert done.returncode == 2 and f"no revision {wrong}" in done.stderr and "--revision" in done.stderr
    assert not (tmp_path / "a.parquet").exists()

    files = {p.name: p.read_bytes() for p in sample_snapshot.root.iterdir()}
    with _HubMissingAFile(AM_THINKING_REPO, files, AM_THINKING_REVISION, missing="math.jsonl") as hub:
        done = _get_from_hub(hub, tmp_path / "b.parquet", tmp_path / "cache2")
        assert done.returncode == 2 and "cannot be downloaded" in done.stderr and "math.jsonl" in done.stderr
    assert not (tmp_path / "b.parquet").exists()


class _HubMissingAFile:
    """A hub whose listing names a file that its download endpoint does not have."""

    def __init__(self, repo, files, commit, missing):
        from testing.local_hub import LocalHub

        self.hub = LocalHub(repo, files, commit)
        self.missing = missing

    def __enter__(self):
        hub = self.hub.__enter__()
        serve_file = hub._file

        def without_missing(request, repo, revision, file, body):
            if file == self.missing:
                return hub._error(request, 404, "EntryNotFound", f"{file} does not exist at {revision}")
            return serve_file(request, repo, revision, file, body)

        hub._file = without_missing
        return hub

    def __exit__(self, *exc):
        self.hub.__exit__(*exc)
