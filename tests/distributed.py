"""Runs a function on N CPU processes with a gloo process group and megatron-core redirected to CPU.

    results = run_distributed(fn, world_size, *args)   # fn(rank, world_size, *args), per-rank returns

`fn` must be importable by name (a module-level function), since ranks are spawned processes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn, args):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    from common import megatron_cpu

    megatron_cpu.enable()
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        return fn(rank, world_size, *args)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 600):
    port = _free_port()
    with mp.get_context("spawn").Pool(world_size) as pool:
        pending = [pool.apply_async(_rank_main, (rank, world_size, port, fn, args)) for rank in range(world_size)]
        return [p.get(timeout=timeout) for p in pending]
