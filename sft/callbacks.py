"""What the training loop does around its steps, one callback per job: metrics and MFU, the non-finite
guard, the finished marker and the end-of-run plot; validation and checkpoints are callbacks too, the
components of sft/validator.py and sft/checkpointer.py.

The loop (sft/trainer.py) calls, on every callback sorted by `Callback.order`:

    on_start(trainer)                   once, before the first step
    before_step(trainer)                before each step
    after_step(trainer, step)           after each step and the ranks' agreement on stopping
    before_validation(trainer)          before each validation pass (called by the validator)
    on_end(trainer, failed)             once, after the last step or when the loop is left by an error

Every hook is collective where what it does is (validation, saving): all ranks call them in the same
order. The trainer builds the validator and the checkpointer from the configuration (or the factories
it is given). A test injects a fault at a chosen point with a callback of its own
(`Trainer(callbacks=[...])`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.files import write_json_atomic
from models.registry import family_of

from .checkpointing import FINISHED_FILE
from .metrics import peak_memory_gb
from .plots import plot_metrics

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


@dataclass(frozen=True)
class StepResult:
    """One optimizer step (or a skipped one), as the loop hands it to the callbacks."""

    loss: float  # the global per-token loss
    lr: float  # the learning rate the step used
    grad_norm: float
    loss_tokens: int
    consumed_before: int  # samples consumed before the step: where its global batch starts
    seconds: float
    finite: bool  # False: the step was skipped


class Callback:
    """A no-op for every hook; a callback overrides the ones it needs.

    The trainer runs its callbacks sorted by `order` (stably: equal orders keep the order given), so a
    step's metrics are logged before the guard may end the run, and the validation loss of an iteration
    is known before its checkpoint is written. Hooks run on every rank unless the callback returns early
    on some; a hook that does something collective (validation, saving) must run on all ranks, in the
    same order. A callback with state of its own returns it from `state_dict` (picklable); the
    checkpointer saves it with every checkpoint and hands it back to `load_state_dict` on resume."""

    order: int = 100  # the trainer's own callbacks are numbered below 100; a user's run after them

    def on_start(self, trainer: Trainer) -> None:
        """Once, as `train()` starts: after the model is built and any checkpoint resumed."""

    def before_step(self, trainer: Trainer) -> None:
        """Before each step; trainer.state.iteration is the number of steps done."""

    def after_step(self, trainer: Trainer, step: StepResult) -> None:
        """After each step and the ranks' agreement on stopping (trainer.stop_agreed); trainer.state
        counts the step."""

    def before_validation(self, trainer: Trainer) -> None:
        """Before each validation pass (sft/validator.py), on every rank."""

    def on_end(self, trainer: Trainer, failed: bool) -> None:
        """Once, after the last step, or with `failed` when an exception leaves the loop (then the other
        ranks may be gone: nothing collective)."""

    def state_dict(self) -> dict[str, Any] | None:
        """What this callback needs to continue exactly after a resume (None: nothing)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what `state_dict` returned in the checkpoint resumed from."""


class StepMetrics(Callback):
    """Every logging.log_interval steps (and the last one), on rank 0: loss, learning rate, gradient
    norm, throughput and MFU against the trainer's peak, to the console, JSONL, TensorBoard and wandb."""

    order = 10  # first: a step that ends the run is still logged

    def after_step(self, trainer: Trainer, step: StepResult) -> None:
        config, state = trainer.config, trainer.state
        last = state.iteration == trainer.train_iters
        if trainer.rank != 0 or (state.iteration % config.logging.log_interval and not last):
            return
        lengths = trainer.data.conversation_lengths(step.consumed_before, config.schedule.global_batch_size)
        tokens = int(lengths.sum())
        tflops = (
            family_of(trainer.arch).training_flops(trainer.arch, lengths)
            / step.seconds
            / trainer.world_size
            / 1e12
        )
        trainer.metrics.log(
            state.iteration,
            {
                "loss": step.loss,
                "lr": step.lr,
                "grad_norm": step.grad_norm,
                "loss_tokens": step.loss_tokens,
                "tokens": tokens,
                "skipped_steps": state.skipped_steps,
                "step_skipped": not step.finite,
                "step_time_s": step.seconds,
                "tokens_per_s": tokens / step.seconds,
                "tflops_per_device": tflops,
                "mfu": tflops / trainer.peak_tflops,
                "peak_memory_gb": peak_memory_gb(trainer.device),
                "consumed_samples": state.consumed_samples,
                "epoch": state.consumed_samples / trainer.data.order.epoch_size,
            },
        )


class NonFiniteGuard(Callback):
    """Ends the run (NonFiniteLossError, on every rank: the loss and gradient norm are global) after
    schedule.max_consecutive_nonfinite skipped steps in a row; the count survives a resume."""

    order = 20

    def __init__(self) -> None:
        self.consecutive = 0  # skipped steps since the last good one

    def after_step(self, trainer: Trainer, step: StepResult) -> None:
        self.consecutive = 0 if step.finite else self.consecutive + 1
        limit = trainer.config.schedule.max_consecutive_nonfinite
        if self.consecutive >= limit:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive iterations (up to {trainer.state.iteration}) had a "
                f"non-finite loss or gradient norm (loss {step.loss}, grad norm {step.grad_norm}); the "
                "weights are those of the last good step. Lower optimizer.lr, check the data, or resume "
                "from an earlier checkpoint."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive = state["consecutive"]


class FinishedMarker(Callback):
    """SAVE_DIR/finished.json on rank 0 once every iteration has run (slurm/sft.sh stops requeueing on
    it); after the checkpointer has published the last checkpoint."""

    order = 50

    def on_end(self, trainer: Trainer, failed: bool) -> None:
        state = trainer.state
        if failed or state.iteration < trainer.train_iters or trainer.rank != 0:
            return
        last = trainer.checkpointer.last
        write_json_atomic(
            Path(trainer.config.checkpoint.save_dir) / FINISHED_FILE,
            {
                "iterations": state.iteration,
                "consumed_samples": state.consumed_samples,
                "skipped_steps": state.skipped_steps,
                "checkpoint": str(last) if last else None,
            },
        )


class CurvesPlot(Callback):
    """SAVE_DIR/metrics.png from metrics.jsonl on rank 0 at the end (logging.plot); a failure to draw is
    no reason to fail a trained run."""

    order = 60

    def on_end(self, trainer: Trainer, failed: bool) -> None:
        if failed or trainer.rank != 0 or not trainer.config.logging.plot:
            return
        trainer.metrics.close()  # flushed before it is read
        out = trainer.metrics.path.with_name("metrics.png")
        try:
            plot_metrics(trainer.metrics.path, out)
        except Exception as exc:
            log.warning("could not draw %s: %s", out, exc)
        else:
            log.info("training curves: %s", out)


def default_callbacks() -> list[Callback]:
    """The trainer's own jobs besides validation (order 30) and checkpoints (order 40), which it builds
    as components (sft/validator.py, sft/checkpointer.py)."""
    return [StepMetrics(), NonFiniteGuard(), FinishedMarker(), CurvesPlot()]
