"""The checkpointer: the run's resume, its saves on schedule, and their publication.

A component of the trainer (sft/trainer.py builds it with `Checkpointer.build`, or with the factory
given as `Trainer(checkpointer=...)`) and a callback (sft/callbacks.py):

    checkpointer = Checkpointer.build(trainer)      # from config.checkpoint and the run's inputs
    trainer.state = checkpointer.resume(trainer)     # the module's and the callbacks' state, or a fresh start
    # after each step: publishes a finished asynchronous save, saves every checkpoint.save_interval steps,
    # at the end (checkpoint.save_at_end) and when the ranks agreed to stop; at the end of the run waits
    # for the save in flight, or abandons it when the run failed (the other ranks may be gone)

The format, atomic publication, asynchronous writing and keep_last_n are sft/checkpointing.py's.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from .callbacks import Callback, StepResult
from .checkpointing import CheckpointSaver, TrainState, load_checkpoint
from .config import CheckpointConfig, dump_config

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)


def callback_keys(callbacks: list[Callback]) -> list[str]:
    """Each callback's name in a checkpoint: its class's, numbered from the second of a class on."""
    seen: Counter = Counter()
    keys = []
    for callback in callbacks:
        name = type(callback).__name__
        keys.append(f"{name}#{seen[name]}" if seen[name] else name)
        seen[name] += 1
    return keys


class Checkpointer(Callback):
    """Owns the saver (sft/checkpointing.py), the checkpoint to resume from and the schedule of saves;
    collective: every rank calls every method, in the same order. `load_group`: the replicas that split
    the reading of a checkpoint (checkpoint.fully_parallel_load), or None."""

    order = 40  # after validation: a checkpoint follows the validation of its iteration

    def __init__(
        self, config: CheckpointConfig, saver: CheckpointSaver, resume_from: Path | None, load_group=None
    ):
        self.config, self.saver = config, saver
        self.resume_from, self.load_group = resume_from, load_group
        self.last: Path | None = None  # the newest checkpoint this run saved

    @classmethod
    def build(cls, trainer: Trainer) -> Checkpointer:
        """The configured checkpointer; needs megatron-core's process groups (the replicas that split
        the writing and the reading)."""
        from megatron.core import parallel_state

        config, inputs = trainer.config, trainer.inputs
        saving = config.checkpoint
        replicas = parallel_state.get_data_parallel_group(with_context_parallel=True)
        saver = CheckpointSaver(
            saving.save_dir,
            keep_last_n=saving.keep_last_n,
            async_save=saving.async_save,
            fully_parallel_save=saving.fully_parallel_save,
            parallel_group=replicas,
            hf_config_file=inputs.shape.hf_config_file,
            tokenizer_dir=inputs.shape.tokenizer_dir,
            config_yaml=dump_config(config),
            training_data=inputs.data.training_data,
        )
        return cls(saving, saver, inputs.resume_from, replicas if saving.fully_parallel_load else None)

    def resume(self, trainer: Trainer) -> TrainState:
        """Collective: loads the checkpoint to resume from into the trainer's module and callbacks and
        returns its trainer state (a fresh one when there is none)."""
        if self.resume_from is None:
            return TrainState()
        state, saved = load_checkpoint(
            self.resume_from, trainer.module, trainer.layout, trainer.world_size, self.load_group
        )
        for key, callback in zip(callback_keys(trainer.callbacks), trainer.callbacks, strict=True):
            if key in saved:
                callback.load_state_dict(saved[key])
        log.info(
            "resumed from %s at iteration %d (%d samples consumed)",
            self.resume_from,
            state.iteration,
            state.consumed_samples,
        )
        return state

    def save(self, trainer: Trainer) -> Path:
        """The checkpoint of the current iteration; with checkpoint.async_save it is complete only once
        published (between later iterations, or at the end)."""
        callbacks = {
            key: state
            for key, state in zip(
                callback_keys(trainer.callbacks), (c.state_dict() for c in trainer.callbacks), strict=True
            )
            if state is not None
        }
        self.last = self.saver.save(
            trainer.module, trainer.state, trainer.layout.to_dict(trainer.world_size), callbacks
        )
        return self.last

    def due(self, trainer: Trainer) -> bool:
        iteration = trainer.state.iteration
        at_end = iteration == trainer.train_iters and self.config.save_at_end
        return trainer.stop_agreed or at_end or iteration % self.config.save_interval == 0

    def after_step(self, trainer: Trainer, step: StepResult) -> None:
        self.saver.poll()
        if self.due(trainer):
            self.save(trainer)
        if trainer.stop_agreed:
            self.saver.wait()

    def on_end(self, trainer: Trainer, failed: bool) -> None:
        if failed:  # the other ranks may be gone: no collective
            self.saver.close(abort=True)
            return
        try:
            self.saver.wait()
        except BaseException:
            self.saver.close(abort=True)
            raise
        self.saver.close()
