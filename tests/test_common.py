"""Shared helpers: user errors become one line and exit status 2 while everything else keeps its
traceback; directories are published atomically, an old copy staying complete until replaced; local
multi-process runs give each rank the caller's current environment and output, and end what a dead rank
leaves running."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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

    for fd, stream in ((1, "stdout"), (2, "stderr")):  # one write a line: the ranks' lines do not interleave
        os.write(fd, f"rank {rank} to {stream}\n".encode())
    return os.environ.get(name), dist.get_world_size(), os.getpid()


@contextlib.contextmanager
def _output_discarded():
    """File descriptors 1 and 2 on /dev/null (under the test's capture) for the duration."""
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(null, fd)
        yield
    finally:
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(null)


@pytest.mark.slow  # starts the fork server (torch and megatron-core imported): test-fast stays under 90 s
def test_ranks_run_in_new_processes_with_the_callers_environment_and_output(monkeypatch, capfd):
    """The ranks are forked from a long-lived fork server: each call must still hand them the caller's
    environment and stdout/stderr of that moment, as spawned processes would get them."""
    with _output_discarded():  # a fork server started here has other stdout/stderr than the call below
        before = run_distributed(_rank_view, 2, "K2_RANK_PROBE")
    monkeypatch.setenv("K2_RANK_PROBE", "set after the first call")
    after = run_distributed(_rank_view, 2, "K2_RANK_PROBE")
    assert [(value, size) for value, size, _ in before] == [(None, 2), (None, 2)]
    assert [(value, size) for value, size, _ in after] == [("set after the first call", 2)] * 2
    pids = [pid for *_, pid in before + after]
    assert len(set(pids)) == 4 and os.getpid() not in pids
    out, err = capfd.readouterr()
    assert {"rank 0 to stdout", "rank 1 to stdout"} <= set(out.splitlines())
    assert {"rank 0 to stderr", "rank 1 to stderr"} <= set(err.splitlines())


def _rank_leaving_a_process(rank: int, world_size: int, pid_file: str) -> None:
    child = subprocess.Popen(["sleep", "300"])
    Path(pid_file).write_text(str(child.pid))
    os._exit(1)  # as a rank killed or ended by the watchdog: no exit handler ends its children


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended, waiting for its new parent to collect it


@pytest.mark.slow  # a training run, a subprocess or a full pipeline: test-fast stays under 90 s
def test_what_a_dead_rank_leaves_running_is_ended(tmp_path):
    with pytest.raises(RuntimeError, match="rank 0 exited with status 1 without a result"):
        run_distributed(_rank_leaving_a_process, 1, str(tmp_path / "pid"))
    pid = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 10
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(pid)


def _rank_waiting(rank: int, world_size: int, pid_dir: str, hold_the_gil: bool) -> None:
    Path(pid_dir, f"rank{rank}").write_text(str(os.getpid()))
    if hold_the_gil:  # as a rank stuck in a C call that keeps the GIL: none of its threads can run
        ctypes.PyDLL(None).pause()
    time.sleep(300)


@pytest.mark.slow
@pytest.mark.parametrize("killed", ["the caller's process group", "the caller alone"])
def test_ranks_end_with_a_caller_killed_before_its_clean_up(killed, tmp_path):
    """Ranks have process groups of their own, so `timeout` or a Ctrl-C aimed at the caller's group misses
    them; a caller killed outright (no finally, no clean-up) must still not leave them running. Killed with
    its group (as `timeout` kills), the ranks hold the GIL: only the kernel's parent-death signal can end
    them; killed alone, the fork server lives on and the ranks must notice the caller's end themselves."""
    root = Path(__file__).resolve().parents[1]
    hold_the_gil = killed == "the caller's process group"
    caller = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path[:0] = [{str(root)!r}, {str(root / 'tests')!r}]\n"
            "from common.distributed import run_distributed\n"
            "from test_common import _rank_waiting\n"
            f"run_distributed(_rank_waiting, 2, {str(tmp_path)!r}, {hold_the_gil})",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a process group of its own, as `timeout` gives its command
    )
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("rank*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*"))]
    assert len(pids) == 2 and all(_running(pid) for pid in pids)
    if hold_the_gil:
        os.killpg(caller.pid, signal.SIGKILL)
    else:
        caller.kill()
    caller.wait()
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(pid) for pid in pids)


_HOLD_THE_WRITE_RESULTS_QUEUE = """
import os, queue, sys, time
sys.path.insert(0, {root!r})
from sft.checkpointing import install_write_results_queue
from megatron.core.dist_checkpointing.strategies import filesystem_async
assert isinstance(install_write_results_queue(async_save=False), queue.Queue)  # synchronous: in-process
shared = install_write_results_queue(async_save=True)
print(shared._manager._process.pid, flush=True)
assert install_write_results_queue(async_save=False) is shared
assert install_write_results_queue(async_save=True) is shared
assert filesystem_async._get_write_results_queue() is shared
time.sleep(600)
"""


@pytest.mark.slow  # a subprocess importing megatron-core
def test_the_async_writers_results_queue_dies_with_a_killed_rank():
    """megatron-core's asynchronous checkpoint writer reports through a multiprocessing manager's queue;
    its server process outlived a rank killed with SIGKILL (found left behind by the Slurm test of a
    killed rank). The queue the trainer installs comes from a manager that dies with the rank (and for
    synchronous saves, which put and get in the rank itself, from no manager at all)."""
    root = str(Path(__file__).resolve().parents[1])
    rank = subprocess.Popen(
        [sys.executable, "-c", _HOLD_THE_WRITE_RESULTS_QUEUE.format(root=root)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        server = int(rank.stdout.readline())
        assert _running(server)
        os.kill(rank.pid, signal.SIGKILL)
        rank.wait(10)
        deadline = time.monotonic() + 10
        while _running(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(server), "the manager's server outlived the killed rank"
    finally:
        rank.kill()
