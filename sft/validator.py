"""The validator: the loss on the held-out packs, every eval.interval steps and at the end of the run.

A component of the trainer (sft/trainer.py builds it with `Validator.build`, or with the factory given
as `Trainer(validator=...)`), and a callback (sft/callbacks.py) whose `after_step` decides when it runs:

    validator = Validator(valid_data, interval=200)
    val_loss = validator.validate(trainer)              # collective: every rank, at the same iteration

The loss is the per-token mean over every loss token of the held-out packs, forward only, through the
same pipeline schedule as training; it goes to the metrics as val_loss with its token and pack counts.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .callbacks import Callback, StepResult
from .data import ValidationData

if TYPE_CHECKING:
    from .trainer import Trainer


class Validator(Callback):
    """Owns the held-out data and when it is evaluated (`interval` steps, 0: only at the end)."""

    order = 30  # after the step's metrics and the guard, before the checkpoint that follows it

    def __init__(self, data: ValidationData, interval: int):
        self.data, self.interval = data, interval

    @classmethod
    def build(cls, trainer: Trainer) -> Validator | None:
        """The configured validator, or None when the run has no held-out data."""
        valid = trainer.inputs.valid
        return None if valid is None else cls(valid, trainer.config.eval.interval)

    def due(self, iteration: int, train_iters: int) -> bool:
        at_interval = self.interval > 0 and iteration % self.interval == 0
        return at_interval or iteration == train_iters

    def after_step(self, trainer: Trainer, step: StepResult) -> None:
        if self.due(trainer.state.iteration, trainer.train_iters):
            self.validate(trainer)

    def validate(self, trainer: Trainer) -> float:
        """Collective: the validation loss at the trainer's current weights; logged and returned."""
        for callback in trainer.callbacks:
            callback.before_validation(trainer)
        start = time.perf_counter()
        layout, dp_size, on_gpu = trainer.layout, trainer.dp_size, trainer.device == "cuda"

        def batches():
            for batch in self.data.micro_batches(layout, trainer.dp_rank, dp_size, trainer.cp_rank):
                yield batch.to(torch.cuda.current_device()) if on_gpu else batch

        # a forward over the packs of this many global batches takes less than as many training steps
        steps_worth = len(self.data.packs) / trainer.config.schedule.global_batch_size
        with trainer.watchdog.watch("validation", trainer.state.iteration, steps_worth):
            count = self.data.micro_batch_count(layout, dp_size)
            reduced = trainer.module.forward_backward(batches, count, trainer.row_width, forward_only=True)
            loss_sum, loss_tokens = trainer.module.global_loss(reduced)
        val_loss = loss_sum / max(loss_tokens, 1)
        trainer.metrics.log_validation(
            trainer.state.iteration,
            {
                "val_loss": val_loss,
                "val_loss_tokens": loss_tokens,
                "val_packs": len(self.data.packs),
                "val_time_s": time.perf_counter() - start,
            },
        )
        return val_loss
