"""Rank-aware logging set-up used by every entry point.

`setup_logging()` configures the root logger once: INFO on rank 0, WARNING on the other ranks (rank
from the RANK environment variable that torchrun and Slurm launchers set), with the rank in each line
when the job is distributed. It also silences the warnings that dependencies print on every import
about optional accelerators and their own deprecations: expected, not actionable by a user, and
repeated once per process; our entry points log which implementations run instead.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

_EXPECTED_WARNINGS = (
    r".*Transformer Engine and Apex are not installed.*",
    r"Apex is not installed.*",
    r".*recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS.*",
    r"full scope is deprecated.*",
    r"`load_state_dict` is deprecated.*",
    r"Please use DTensor instead.*",
    r"`torch.distributed.all_gather_into_tensor` is deprecated.*",
    r"torch.distributed is disabled, unavailable or uninitialized.*",
    r"`torch.distributed.reduce_scatter_tensor` is deprecated.*",
    # megatron-core's distributed optimizer attaches gradients to fp32 shard views on purpose
    r"The .grad attribute of a Tensor that is not a leaf Tensor is being accessed.*",
)


def quiet_dependencies() -> None:
    for message in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("megatron.core.distributed.fsdp").setLevel(logging.WARNING)


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted: test runners and notebooks swap it,
    and a handler holding the old stream would write to a closed file."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int | None = None) -> None:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if level is None:
        level = logging.INFO if rank == 0 else logging.WARNING
    prefix = f"[rank {rank}] " if world > 1 else ""
    handler = _CurrentStderrHandler()
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_dependencies()
