"""What the training loop does around its steps, one callback per job: metrics and MFU, the non-finite
guard, evaluation, checkpoints, the finished marker and the end-of-run plot.

The loop (sft/trainer.py) calls, on every callback in order:

    on_start(trainer)                   once, before the first step
    before_step(trainer)                before each step
    after_step(trainer, step)           after each step and the ranks' agreement on stopping
    on_end(trainer, failed)             once, after the last step or when the loop is left by an error

Every hook is collective where what it does is (evaluation, saving): all ranks call them in the same
order. A test injects a fault at a chosen point with a callback of its own (`Trainer(callbacks=[...])`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from common.files import write_json_atomic
from models.registry import family_of

from .checkpointing import FINISHED_FILE
from .metrics import peak_memory_gb
from .plots import plot_metrics

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
    """A no-op for every hook; a callback overrides the ones it needs."""

    def on_start(self, trainer) -> None:
        pass

    def before_step(self, trainer) -> None:
        pass

    def after_step(self, trainer, step: StepResult) -> None:
        pass

    def on_end(self, trainer, failed: bool) -> None:
        pass


class StepMetrics(Callback):
    """Every logging.log_interval steps (and the last one): loss, learning rate, gradient norm,
    throughput and MFU against the trainer's peak, to the console, JSONL, TensorBoard and wandb."""

    def after_step(self, trainer, step: StepResult) -> None:
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
    """Ends the run after schedule.max_consecutive_nonfinite skipped steps in a row."""

    def after_step(self, trainer, step: StepResult) -> None:
        state, limit = trainer.state, trainer.config.schedule.max_consecutive_nonfinite
        if not step.finite and state.consecutive_nonfinite >= limit:
            raise NonFiniteLossError(
                f"{state.consecutive_nonfinite} consecutive iterations (up to {state.iteration}) had a "
                f"non-finite loss or gradient norm (loss {step.loss}, grad norm {step.grad_norm}); the "
                "weights are those of the last good step. Lower optimizer.lr, check the data, or resume "
                "from an earlier checkpoint."
            )


class Evaluation(Callback):
    """The validation loss every eval.interval steps and at the end, when there is held-out data."""

    def after_step(self, trainer, step: StepResult) -> None:
        interval, iteration = trainer.config.eval.interval, trainer.state.iteration
        at_interval = interval > 0 and iteration % interval == 0
        if trainer.valid is not None and (at_interval or iteration == trainer.train_iters):
            trainer.evaluate()


class Checkpoints(Callback):
    """Publishes finished asynchronous saves between steps; saves every checkpoint.save_interval steps,
    at the end (checkpoint.save_at_end) and when the ranks agreed to stop; on the end of the run waits
    for the save in flight, or abandons it when the run failed (the other ranks may be gone)."""

    def after_step(self, trainer, step: StepResult) -> None:
        config, iteration = trainer.config.checkpoint, trainer.state.iteration
        trainer.checkpoints.poll()
        at_end = iteration == trainer.train_iters and config.save_at_end
        if trainer.stop_agreed or at_end or iteration % config.save_interval == 0:
            trainer.last_checkpoint = trainer.save()
        if trainer.stop_agreed:
            trainer.checkpoints.wait()

    def on_end(self, trainer, failed: bool) -> None:
        if failed:  # the other ranks may be gone: no collective
            trainer.checkpoints.close(abort=True)
            return
        try:
            trainer.checkpoints.wait()
        except BaseException:
            trainer.checkpoints.close(abort=True)
            raise
        trainer.checkpoints.close()


class FinishedMarker(Callback):
    """SAVE_DIR/finished.json once every iteration has run (slurm/sft.sh stops requeueing on it)."""

    def on_end(self, trainer, failed: bool) -> None:
        state = trainer.state
        if failed or state.iteration < trainer.train_iters or trainer.rank != 0:
            return
        last = trainer.last_checkpoint
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
    """SAVE_DIR/metrics.png from metrics.jsonl (logging.plot); a failure to draw is no reason to fail a
    trained run."""

    def on_end(self, trainer, failed: bool) -> None:
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
    """The trainer's own jobs, in the order they run after a step: the metrics of the step first (so a
    failing step is still logged), then the guard, evaluation before the checkpoint that follows it."""
    return [StepMetrics(), NonFiniteGuard(), Evaluation(), Checkpoints(), FinishedMarker(), CurvesPlot()]
