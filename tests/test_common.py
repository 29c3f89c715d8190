"""Shared helpers: user errors become one line and exit status 2 while everything else keeps its
traceback; directories are published atomically, an old copy staying complete until replaced."""

from __future__ import annotations

import os

import pytest

from common.cli import exit_status
from common.distributed import run_distributed
from common.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    InputError,
    UnsupportedModelError,
    UserError,
)
from common.files import atomic_directory, publish_directory


@pytest.mark.parametrize(
    "error", [InputError, ConfigError, DataError, CheckpointError, UnsupportedModelError]
)
def test_user_errors_are_one_line_and_exit_2(error, capsys):
    def body() -> int:
        raise error("data/am_meta.json: bad thing; re-run tools/preprocess_sft.py")

    assert issubclass(error, UserError)
    assert exit_status(body) == 2
    assert capsys.readouterr().err == "error: data/am_meta.json: bad thing; re-run tools/preprocess_sft.py\n"


@pytest.mark.parametrize("error", [ValueError, FileNotFoundError, RuntimeError, KeyError])
def test_other_errors_keep_their_traceback(error):
    def body() -> int:
        raise error("raised inside torch or megatron-core")

    with pytest.raises(error, match="raised inside"):
        exit_status(body)


def test_atomic_directory_replaces_only_a_complete_output(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(InputError, match="--force"):
        with atomic_directory(out):
            pass
    with pytest.raises(OSError, match="disk"):
        with atomic_directory(out, force=True) as tmp:
            (tmp / "a").write_text("half")
            raise OSError("disk went away")
    assert (out / "a").read_text() == "1" and not (tmp_path / "out.partial").exists()
    with atomic_directory(out, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and not (tmp_path / "out.old").exists()


def test_publish_directory_keeps_a_complete_copy_at_every_moment(tmp_path, monkeypatch):
    import os

    final, new = tmp_path / "iter_0000004", tmp_path / "iter_0000004.partial"
    final.mkdir()
    (final / "w").write_text("old")
    new.mkdir()
    (new / "w").write_text("new")
    seen = []
    real_replace = os.replace

    def watching_replace(src, dst):
        real_replace(src, dst)
        complete = [p for p in (final, tmp_path / "iter_0000004.old") if (p / "w").is_file()]
        seen.append(len(complete))

    monkeypatch.setattr(os, "replace", watching_replace)
    publish_directory(new, final)
    assert (final / "w").read_text() == "new" and not new.exists()
    assert seen and min(seen) >= 1  # after each rename some complete copy exists under a known name
    assert not (tmp_path / "iter_0000004.old").exists()


def _rank_view(rank: int, world_size: int, name: str) -> tuple[str | None, int, int]:
    import torch.distributed as dist

    return os.environ.get(name), dist.get_world_size(), os.getpid()


def test_ranks_run_in_new_processes_with_the_callers_current_environment(monkeypatch):
    """The ranks are forked from a long-lived fork server: each call must still hand them the environment
    of that moment, as spawned processes would get it."""
    before = run_distributed(_rank_view, 2, "K2_RANK_PROBE")  # may start the fork server
    monkeypatch.setenv("K2_RANK_PROBE", "set after the first call")
    after = run_distributed(_rank_view, 2, "K2_RANK_PROBE")
    assert [(value, size) for value, size, _ in before] == [(None, 2), (None, 2)]
    assert [(value, size) for value, size, _ in after] == [("set after the first call", 2)] * 2
    pids = [pid for *_, pid in before + after]
    assert len(set(pids)) == 4 and os.getpid() not in pids
