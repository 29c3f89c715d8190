"""Process groups: starting one in this process, and running a function on N local processes.

    init_process_group("cuda")                            # in a torchrun/Slurm-launched process
    results = run_distributed(fn, world_size, *args, device="cpu")   # per-rank returns of fn

`init_process_group` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
and starts NCCL with one GPU per process, or gloo with megatron-core redirected to the CPU
(common/megatron_cpu.py); without that environment it starts a one-process group. `run_distributed`
starts the ranks itself (tests, tools/verify_conversion.py, the benchmarks); `fn(rank, world_size, *args)`
must be importable by name (a module-level function), since each rank is a new process.

CPU ranks are forked from a multiprocessing fork server that has imported torch and megatron-core once
(PRELOAD), rather than spawned as fresh interpreters that import them again: that import costs seconds
of CPU per rank, paid on every call of a test suite that makes dozens. The fork server is itself a fresh
interpreter that has run nothing (no thread pools), so forking from it is safe; each rank gets the
caller's current environment and stdout/stderr, as a spawned one would. CUDA ranks are spawned: a
process that imported Transformer Engine may have initialised CUDA, which a forked child cannot use.
"""

from __future__ import annotations

import ctypes
import io
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from multiprocessing import reduction
from multiprocessing.connection import wait

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(device: str, timeout_minutes: float = 60) -> None:
    """The default process group for `device` ("cuda" or "cpu"), from torchrun's environment. The timeout
    bounds every collective, checkpoint saves and loads included (torch's default is 10 minutes)."""
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_initialized():
        return
    timeout = timedelta(minutes=timeout_minutes)
    if "RANK" not in os.environ:  # a plain `python pretrain_sft.py`: a group of one
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), timeout=timeout)
    else:
        from common import megatron_cpu

        megatron_cpu.enable()
        dist.init_process_group("gloo", timeout=timeout)


# What every rank imports before running `fn`; the fork server loads these once.
PRELOAD = (
    "torch",
    "torch.distributed",
    "megatron.core.models.gpt",
    "megatron.core.optimizer",
    "megatron.core.pipeline_parallel",
    "megatron.core.dist_checkpointing",
)


class _CallerContext:
    """What each rank takes from the caller at the moment of the call: its environment, and its stdout and
    stderr (a terminal, a log file, a test's capture). A rank forked from the fork server would otherwise
    have the server's, which are those of the server's first caller."""

    def __init__(self, environ: dict[str, str] | None = None, streams: tuple = ()):
        self.environ = dict(os.environ) if environ is None else environ
        self.streams = streams  # (descriptor handed over, the descriptor it becomes in the rank)

    def __reduce__(self):
        # Called while multiprocessing starts a rank: DupFd hands a descriptor over to that process.
        streams = tuple((reduction.DupFd(fd), fd) for fd in (1, 2) if _is_open(fd))
        return _CallerContext, (self.environ, streams)

    def adopt(self) -> None:
        os.environ.clear()
        os.environ.update(self.environ)
        for handed_over, target in self.streams:
            fd = handed_over.detach()
            if fd != target:  # a spawned rank gets the caller's descriptors as they are
                os.dup2(fd, target)
                os.close(fd)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _rank_main(
    rank: int, world_size: int, port: int, device: str, fn, args, results, caller: _CallerContext
) -> None:
    parent = os.getppid()  # the caller (spawned rank) or the fork server, which lives as long as the caller
    caller.adopt()
    os.setpgrp()  # a process group of its own, which the caller ends when the call is over
    _die_with_caller(parent)
    try:
        value = _run_rank(rank, world_size, port, device, fn, args)
        # As bytes: a tensor put on the queue directly travels through shared memory that vanishes
        # when this process exits, possibly before the parent has read it.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException as exc:  # reported to the parent, which raises it
        results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def _die_with_caller(parent: int) -> None:
    """Ends this rank when its caller has gone, in both ways a caller goes (Linux). A rank has a process
    group of its own, so a signal to the caller's group (`timeout`, a Ctrl-C, a Slurm step's end) misses it.
    - Its parent's death SIGKILLs it (PR_SET_PDEATHSIG), stopped or not: the parent is the caller (spawned
      rank) or the fork server, which dies with the caller's process group.
    - A caller killed alone leaves the fork server alive (every rank holds its "alive" pipe), but closes
      its end of the rank's start-up pipe (multiprocessing's parent sentinel): a thread then kills the
      rank's group, the children it started included."""
    if not sys.platform.startswith("linux"):
        return
    die_with_parent(parent)
    caller = mp.parent_process()
    if caller is not None:

        def end_group_when_the_caller_is_gone():
            wait([caller.sentinel])
            os.killpg(os.getpgrp(), signal.SIGKILL)

        threading.Thread(target=end_group_when_the_caller_is_gone, name="caller-watch", daemon=True).start()


def die_with_parent(parent: int | None = None) -> None:
    """This process is SIGKILLed when its parent dies, however the parent dies (Linux; elsewhere a no-op).
    A process started with multiprocessing outlives a parent killed with SIGKILL, whose finalizers
    never run; this closes that. `parent`: the pid it was started by (default: the current parent)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid() if parent is None else parent
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


_PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


def _run_rank(rank: int, world_size: int, port: int, device: str, fn, args):
    import torch.distributed as dist

    from common.logging_utils import setup_logging

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    setup_logging()
    if device != "cuda":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    init_process_group(device)
    try:
        return fn(rank, world_size, *args)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, device: str = "cpu", timeout: float = 1800) -> list:
    """Per-rank return values of `fn`; raises RuntimeError with the failing rank's traceback."""
    if device == "cuda" and torch.cuda.device_count() < world_size:
        raise RuntimeError(
            f"{world_size} processes need {world_size} GPUs; {torch.cuda.device_count()} visible"
        )
    if device == "cuda":  # nothing may touch CUDA before a fork (Transformer Engine's import might): spawn
        context = mp.get_context("spawn")
    else:
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(list(PRELOAD))  # takes effect when the server starts (the first call)
    results = context.Queue()
    caller = _CallerContext()
    port = free_port()
    # Plain (non-daemonic) processes: megatron-core's checkpoint saving starts processes of its own.
    ranks = [
        context.Process(target=_rank_main, args=(rank, world_size, port, device, fn, args, results, caller))
        for rank in range(world_size)
    ]
    for process in ranks:
        process.start()
    outcomes = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(outcomes))
                _raise_if_exited_without_result(ranks, missing, results)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no result from ranks {missing} within {timeout:.0f} s") from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed: {value}")
            outcomes[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for process in ranks:
            process.join(timeout=30 if len(outcomes) == world_size else 1)
            if process.is_alive():
                process.kill()
        for process in ranks:
            _end_leftovers(process.pid)
    return [outcomes[rank] for rank in range(world_size)]


def _end_leftovers(rank_pid: int | None) -> None:
    """Kills what is left of a rank's process group. A rank that dies without its exit handlers leaves its
    children running: megatron-core's checkpoint writer starts a server process that would live on, holding
    the caller's stdout open (a `make test | tee` would then never end)."""
    if rank_pid is None:
        return
    try:
        os.killpg(rank_pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # nothing left, or not a group of ours
        pass


def _raise_if_exited_without_result(ranks: list, missing: list[int], results) -> None:
    """RuntimeError when a rank's process has ended without reporting (killed, os._exit, a crash at
    import), instead of waiting out the timeout. A result still in the queue's pipe is read first."""
    exited = [rank for rank in missing if ranks[rank].exitcode is not None]
    if not exited:
        return
    try:
        results.put(results.get(timeout=5.0))  # a late result: the caller's next get() reads it
        return
    except queue.Empty:
        pass
    codes = ", ".join(f"rank {rank} exited with status {ranks[rank].exitcode}" for rank in exited)
    raise RuntimeError(f"{codes} without a result")
