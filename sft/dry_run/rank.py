"""One measured rank of the dry run, in its own process (the fake process group is per process).

`measure_rank(plan)` starts torch's `fake` process group as `plan.rank` of `plan.world_size`, builds the
rank through `DryRunModule` (sft/train_module.py with the stand-in kernels) on fake tensors and runs
the iterations under a `MemoryTracker`; `measure_module` is the same on real tensors (the tests' check
of the tracker against the allocator).
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time

import numpy as np
import torch

from formats.packed import Pack
from models.backends import Backend
from models.registry import read_arch
from plan.layout import initialize_parallel_state

from ..data import MicroBatch, SFTData, make_micro_batch, split_for_context_parallel
from ..train_module import TrainModule
from . import ITERATIONS, SYNTHETIC_CONVERSATION, RankPlan
from .kernels import (
    STANDINS,
    CoalescedCollectives,
    dry_run_kernel_settings,
    dry_run_layer_spec,
    dry_run_patches,
)
from .tracker import MemoryTracker

log = logging.getLogger(__name__)


class DryRunModule(TrainModule):
    """The trainer's construction with the stand-in kernels, in the cluster's precision; what it builds
    is counted in the tracker's parts (weights, gradient buffers, optimizer state)."""

    gloo_groups = False

    def __init__(self, config, arch, train_iters: int, tracker: MemoryTracker):
        self.tracker = tracker
        super().__init__(config, arch, "cpu", train_iters)

    def params_dtype(self) -> torch.dtype:
        return torch.float32 if self.config.model.precision == "fp32" else torch.bfloat16

    def layer_spec(self):
        return dry_run_layer_spec(
            self.family.layer_spec(self.arch, Backend(False, "the dry run's stand-ins"), packed=False)
        )

    def kernel_settings(self) -> dict:
        return dry_run_kernel_settings()

    def deallocate_pipeline_outputs(self) -> bool:
        return True  # as on the cluster (fake tensors send nothing)

    def _build_model(self, init_checkpoint, load_group):
        with self.tracker.part("weights"):
            chunks, tconfig = super()._build_model(init_checkpoint, load_group)
        for chunk in chunks:
            for buffer in chunk.buffers + chunk.expert_parallel_buffers:
                self.tracker.assign([buffer.grad_data], "grads")
                if buffer.param_data is not None:
                    self.tracker.assign([buffer.param_data], "weights")
        return chunks, tconfig

    def _build_optimizer(self):
        with self.tracker.part("optimizer"):
            return super()._build_optimizer()


@contextlib.contextmanager
def schedule_parts(tracker: MemoryTracker, chunks):
    """Counts what each micro-batch's forward creates as activations (logits from the output layer on),
    and what its backward creates as other (gradients of activations, transients)."""
    from megatron.core.pipeline_parallel import schedules

    forward, backward = schedules.forward_step, schedules.backward_step

    def counted_forward(*args, **kwargs):
        with tracker.part("activations"):
            return forward(*args, **kwargs)

    def counted_backward(*args, **kwargs):
        with tracker.part("other"):
            return backward(*args, **kwargs)

    hooks = [
        module.register_forward_pre_hook(lambda *_: tracker.switch("logits"))
        for chunk in chunks
        for name, module in chunk.named_modules()
        if name.endswith("output_layer")
    ]
    schedules.forward_step, schedules.backward_step = counted_forward, counted_backward
    try:
        yield
    finally:
        schedules.forward_step, schedules.backward_step = forward, backward
        for hook in hooks:
            hook.remove()


def synthetic_rows(plan: RankPlan, seq_length: int) -> tuple[list[MicroBatch], str]:
    """Full-width rows of SYNTHETIC_CONVERSATION-token conversations (as many as fit once padded)."""
    layout = plan.config.parallel
    pad = layout.pad_multiple
    padded = -(-SYNTHETIC_CONVERSATION // pad) * pad
    per_pack = max(1, seq_length // padded)
    length = min(SYNTHETIC_CONVERSATION, seq_length)
    pack = Pack(
        np.zeros(per_pack * length, np.int32),
        np.ones(per_pack * length, np.uint8),
        np.full(per_pack, length, np.int32),
    )
    row = make_micro_batch(
        [pack] * layout.micro_batch_size,
        seq_length,
        pad_multiple=pad,
        width=layout.micro_batch_size * seq_length,
    )
    description = (
        f"synthetic: {layout.micro_batch_size} x {seq_length}-token rows of {per_pack} conversations of "
        f"{length} tokens per pack (no data files here)"
    )
    return [row] * plan.micro_batches, description


def data_rows(
    plan: RankPlan, data: SFTData, dp_rank: int, dp_size: int, cp_rank: int
) -> tuple[list[MicroBatch], str]:
    """The first step's micro-batches of this rank from the configured data (this CP rank's share)."""
    config = plan.config
    batches = data.micro_batches(
        0, config.schedule.global_batch_size, config.parallel, dp_rank, dp_size, cp_rank
    )
    description = f"the first step of {', '.join(config.data.prefixes)}"
    return batches[: plan.micro_batches], description


def rows_for(plan: RankPlan) -> tuple[list[MicroBatch], str]:
    from megatron.core import parallel_state

    config = plan.config
    cp_size = parallel_state.get_context_parallel_world_size()
    cp_rank = parallel_state.get_context_parallel_rank()
    if plan.with_data:
        data = SFTData(config.data.prefixes, config.data.weights, config.data.seed)
        dp_rank = parallel_state.get_data_parallel_rank()
        return data_rows(plan, data, dp_rank, parallel_state.get_data_parallel_world_size(), cp_rank)
    rows, description = synthetic_rows(plan, config.data.seq_length)
    return [split_for_context_parallel(row, cp_size, cp_rank) for row in rows], description


def run_iterations(module: TrainModule, tracker: MemoryTracker, rows: list[MicroBatch], iterations: int):
    width = rows[0].tokens.shape[1] * module.layout.context
    for _ in range(iterations):
        module.zero_grad()
        with schedule_parts(tracker, module.chunks):
            module.forward_backward(lambda: rows, len(rows), width)
        with tracker.part("optimizer"):
            module.gradient_norm()
            module.optimizer_step()


def measure_rank(plan: RankPlan, fake: bool = True, around=contextlib.nullcontext) -> dict:
    """Runs in a fresh process: the rank's peak and its parts, in bytes. `fake=False` runs the same on
    real (zero-filled) tensors, inside `around()` (the tests' allocator profile) from construction on."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from common import megatron_cpu
    from common.logging_utils import setup_logging

    setup_logging(logging.WARNING)
    start = time.perf_counter()
    megatron_cpu.enable()
    dist.init_process_group("fake", store=FakeStore(), rank=plan.rank, world_size=plan.world_size)
    try:
        layout = plan.config.parallel
        initialize_parallel_state(layout, plan.config.timeout_minutes, gloo_groups=DryRunModule.gloo_groups)
        rows, description = rows_for(plan)
        arch = read_arch(plan.hf_config_file)
        tracker = MemoryTracker(fake_scalar=1.0)
        tensors = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
        with dry_run_patches(), around(), tensors, CoalescedCollectives(), tracker:
            module = DryRunModule(plan.config, arch, train_iters=100, tracker=tracker)
            run_iterations(module, tracker, rows, ITERATIONS)
            del module  # inside `around`: what it frees is seen there too
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    return {
        "peak_bytes": tracker.peak_bytes,
        "parts": tracker.peak_parts,
        "seconds": time.perf_counter() - start,
        "host_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rows": description,
        "stand_ins": list(STANDINS.values()),
    }
