"""The body of pretrain_sft.py: pre-flight, the process group and CUDA set-up, the trainer, teardown.

    result = run(load_config("configs/k2think_qwen2.5_32b.yaml", overrides))    # under torchrun / srun

The configuration is checked against the data, the checkpoint and the world size (sft/preflight.py)
before any process group or model exists, so a bad one fails in seconds on every rank.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

import torch
import torch.distributed as dist

from common.distributed import init_process_group
from plan.layout import ParallelLayout

from .config import TrainConfig
from .preflight import check_run
from .trainer import Trainer, TrainResult

log = logging.getLogger(__name__)


def resolve_device(config: TrainConfig) -> str:
    """device=auto: CUDA when available."""
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def set_cuda_device_max_connections(
    layout: ParallelLayout, device: str, environ: MutableMapping[str, str]
) -> None:
    """Tensor/sequence parallelism overlaps its communication with compute only in issue order, which
    needs one CUDA hardware queue: CUDA_DEVICE_MAX_CONNECTIONS=1, set before CUDA starts (as Megatron-LM
    requires); an explicit other value is kept, with a warning."""
    if device != "cuda" or (layout.tensor == 1 and not layout.sequence_parallel):
        return
    current = environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    if current is None:
        environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
        log.info(
            "CUDA_DEVICE_MAX_CONNECTIONS=1 (tensor parallelism orders its communication through one queue)"
        )
    elif current != "1":
        log.warning(
            "CUDA_DEVICE_MAX_CONNECTIONS=%s: tensor parallelism wants 1 (communication and compute may "
            "interleave in the wrong order and lose overlap)",
            current,
        )


def run(config: TrainConfig) -> TrainResult:
    """Validates, starts the process group, trains, tears down."""
    from megatron.core import parallel_state

    device = resolve_device(config)
    inputs = check_run(config, int(os.environ.get("WORLD_SIZE", "1")), device)
    set_cuda_device_max_connections(config.parallel, device, os.environ)
    init_process_group(device, config.timeout_minutes)
    try:
        return Trainer(config, device, inputs).train()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
