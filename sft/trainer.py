"""The SFT trainer on megatron-core: the training loop.

Started once per process by pretrain_sft.py (sft/launch.py: torchrun / Slurm), or in each rank of
run_distributed (tests):

    trainer = Trainer(config, device="cpu")      # process group already initialised
    result = trainer.train()                     # or: with Trainer(...) as trainer: trainer.step()

The pieces, each built here from the configuration and swappable through the constructor:
`TrainModule` (sft/train_module.py) builds the rank's model, DDP wrapper, distributed optimizer and
schedule, runs one forward/backward and holds the state a checkpoint saves; `StepBatches`
(sft/batches.py) gives the data-parallel rank's micro-batches of the next global batch, prefetched; the
validator (sft/validator.py) and the checkpointer (sft/checkpointer.py, which also resumes) are
callbacks like the metrics, the non-finite guard, the finished marker and the plot (sft/callbacks.py).
The loop itself steps (per-token loss normalisation, docs/architecture.md; a step with a non-finite loss
or gradient norm is skipped), lets the ranks agree on stopping (SIGTERM/SIGUSR1 on any rank), and hands
each step to the callbacks.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from common.devices import RECIPE_ACCELERATOR, find_accelerator, peak_tflops
from plan.layout import initialize_parallel_state

from .batches import StepBatches
from .callbacks import Callback, StepResult, default_callbacks
from .checkpointer import Checkpointer
from .checkpointing import TrainState
from .config import TrainConfig, dump_config
from .metrics import MetricsLogger
from .preflight import RunInputs, check_run, schedule_summary
from .train_module import LossFunction, TrainModule, loss_func
from .validator import Validator
from .watchdog import StepWatchdog

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    iterations_done: int
    losses: dict[int, float]  # iteration -> global per-token loss
    stopped_by_signal: bool
    last_checkpoint: Path | None


class Trainer:
    """One rank's training run; needs an initialised process group. `inputs`: from check_run (done here
    when not given); `callbacks`: run after the trainer's own unless their `order` says otherwise
    (sft/callbacks.py); `loss_function`: each micro-batch's loss (sft/train_module.loss_func);
    `validator` and `checkpointer`: factories called with the trainer once its process groups and
    data exist (a validator factory may return None: no validation)."""

    def __init__(
        self,
        config: TrainConfig,
        device: str,
        inputs: RunInputs | None = None,
        callbacks: Sequence[Callback] = (),
        *,
        loss_function: LossFunction = loss_func,
        validator: Callable[[Trainer], Validator | None] = Validator.build,
        checkpointer: Callable[[Trainer], Checkpointer] = Checkpointer.build,
    ):
        from megatron.core import parallel_state

        self.config, self.device = config, device
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.inputs = inputs or check_run(config, self.world_size, device)
        self.data, self.arch, self.train_iters = self.inputs.data, self.inputs.arch, self.inputs.train_iters
        self.layout = config.parallel
        initialize_parallel_state(self.layout, config.timeout_minutes)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.row_width = self.data.row_width(self.layout)
        self.peak_tflops = self._peak_tflops()
        self.metrics = MetricsLogger(config, self.rank == 0)  # before the heavy set-up: wandb fails early
        self.checkpointer = checkpointer(self)
        resuming = self.checkpointer.resume_from is not None
        self.module = TrainModule(
            config,
            self.arch,
            device,
            self.train_iters,
            init_checkpoint=None if resuming else config.model.init_checkpoint,
            load_group=self.checkpointer.load_group,
            loss_function=loss_function,
        )
        if not resuming and not config.model.init_checkpoint:
            log.info(
                "initial weights: random (std %g) for %s",
                self.module.tconfig.init_method_std,
                config.model.random_init_config,
            )
        self.validator = validator(self)
        components = [c for c in (self.validator, self.checkpointer) if c is not None]
        self.callbacks: list[Callback] = sorted(
            [*default_callbacks(), *components, *callbacks], key=lambda c: c.order
        )
        self.state: TrainState = self.checkpointer.resume(self)
        self.metrics.resume_at(self.state.iteration)
        self.batches = StepBatches(
            self.data, config, self.layout, self.dp_rank, self.dp_size, self.cp_rank, device
        )
        self.watchdog = StepWatchdog(config.watchdog, self.rank)
        self._stop_signal: int | None = None
        self.stop_agreed = False  # by every rank, after the last step (agree_on_stop)

    def _peak_tflops(self) -> float:
        """MFU's denominator: logging.peak_tflops_per_device, or the datasheet peak of this GPU."""
        configured = self.config.logging.peak_tflops_per_device
        if configured is not None:
            return configured
        name = torch.cuda.get_device_name() if self.device == "cuda" else None
        found = find_accelerator(name) if name else None
        if found is None and self.rank == 0:
            log.log(
                logging.WARNING if name else logging.INFO,
                "%s is not in common/devices.py: MFU is against the %s's %g TFLOP/s "
                "(set logging.peak_tflops_per_device)",
                name or "a CPU",
                RECIPE_ACCELERATOR.name,
                RECIPE_ACCELERATOR.bf16_dense_tflops,
            )
        return peak_tflops(name)

    # The loop ----------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Runs the remaining iterations (the callbacks do the rest: sft/callbacks.py), then releases
        everything (`close`)."""
        config = self.config
        if self.rank == 0:
            log.info("configuration:\n%s", dump_config(config))
            log.info(
                "%s, layout %s",
                schedule_summary(
                    self.train_iters, config.schedule.global_batch_size, self.data.order.epoch_size
                ),
                self.layout.describe(self.world_size),
            )
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        losses, failed = {}, True
        try:
            for callback in self.callbacks:
                callback.on_start(self)
            while self.state.iteration < self.train_iters:
                loss = self.step().loss
                losses[self.state.iteration] = loss
                if self.stop_agreed:
                    log.warning(
                        "stopping after iteration %d on signal %s; checkpoint %s",
                        self.state.iteration,
                        signal.Signals(self._stop_signal).name if self._stop_signal else "(other rank)",
                        self.checkpointer.last,
                    )
                    break
            failed = False
        finally:
            try:
                for callback in self.callbacks:
                    callback.on_end(self, failed)
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
                self.close()
        return TrainResult(
            self.state.iteration,
            losses,
            self._stop_signal is not None or self.state.iteration < self.train_iters,
            self.checkpointer.last,
        )

    def step(self) -> StepResult:
        """One iteration of the loop: the callbacks before it, the step under the watchdog, the ranks'
        agreement on stopping, the callbacks after it."""
        for callback in self.callbacks:
            callback.before_step(self)
        with self.watchdog.step(self.state.iteration + 1):
            result = self.train_step()
            self.watchdog.phase("stop agreement")
            self.stop_agreed = self.agree_on_stop()
        for callback in self.callbacks:
            callback.after_step(self, result)
        return result

    def train_step(self) -> StepResult:
        """One optimizer step on the next global batch (or a skipped one)."""
        state, module = self.state, self.module
        start = time.perf_counter()
        self.watchdog.phase("data")
        micro_batches = self.batches.get(state.consumed_samples)
        self.watchdog.phase("forward-backward (gradient reduction included)")
        module.zero_grad()
        reduced = module.forward_backward(lambda: micro_batches, len(micro_batches), self.row_width)
        self.watchdog.phase("loss all-reduce")
        loss_sum, loss_tokens = module.global_loss(reduced)
        loss = loss_sum / max(loss_tokens, 1)
        self.watchdog.phase("gradient norm")
        found_inf, grad_norm = module.gradient_norm()
        finite = not found_inf and math.isfinite(loss) and math.isfinite(grad_norm)
        lr = module.lr  # the rate this step uses
        self.watchdog.phase("optimizer step")
        if finite:
            module.optimizer_step()
        else:
            state.skipped_steps += 1
        state.iteration += 1
        consumed_before = state.consumed_samples
        state.consumed_samples += self.config.schedule.global_batch_size
        if self.device == "cuda":
            torch.cuda.synchronize()
        return StepResult(
            loss, lr, grad_norm, loss_tokens, consumed_before, time.perf_counter() - start, finite
        )

    def agree_on_stop(self) -> bool:
        """Collective: whether any rank got a stop signal (saving is collective, so all ranks must agree
        to stop after the same iteration)."""
        stop = 0 if self._stop_signal is None else 1
        flag = torch.tensor([stop], dtype=torch.int32, device=self.module.collective_device)
        dist.all_reduce(flag)
        return bool(flag.item())

    def close(self) -> None:
        """Releases the metrics sinks, the watchdog and the prefetch thread (idempotent)."""
        self.metrics.close()
        self.watchdog.close()
        self.batches.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum
        log.warning("received %s: will checkpoint and stop after this iteration", signal.Signals(signum).name)
