"""Rank-aware logging set-up used by every entry point.

`setup_logging()` configures the root logger once: INFO on rank 0, WARNING on the other ranks (rank
from the RANK environment variable that torchrun and Slurm launchers set), with the rank in each line
when the job is distributed.
"""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: int | None = None) -> None:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if level is None:
        level = logging.INFO if rank == 0 else logging.WARNING
    prefix = f"[rank {rank}] " if world > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
