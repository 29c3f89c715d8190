"""Per-rank bodies for the trainer tests (run as ranks by common.distributed.run_distributed).

`train(rank, world_size, overrides, fault)` trains with the given config overrides and returns the
per-iteration losses. `fault` injects what a real run meets, inside the real code path:

- ("crash_after", k): the process dies (an exception escapes) during iteration k + 1;
- ("crash_in_save", k): the save at iteration k dies after writing part of the checkpoint;
- ("crash_during_async_save", k): the background writers are slowed down, and the process dies during
  iteration k + 1 while the checkpoint of iteration k is still being written; the result records which
  checkpoints were complete when each save started;
- ("signal", k): rank 0 receives SIGUSR1 during iteration k;
- ("nan_loss", k): the loss of iteration k is NaN (k = 0: every iteration);
- ("freeze", k): the last rank stops (SIGSTOP, as a frozen node: its threads too) at the start of
  iteration k; the others block in the step's first collective.
"""

from __future__ import annotations

import math
import os
import signal
import time


class InjectedCrash(RuntimeError):
    pass


def _inject(trainer, fault) -> None:
    from megatron.core import dist_checkpointing

    import sft.train_module as train_module

    kind, k = fault
    step = trainer.train_step

    if kind == "crash_after":

        def crashing_step():
            if trainer.state.iteration == k:
                raise InjectedCrash(f"killed during iteration {k + 1}")
            return step()

        trainer.train_step = crashing_step
    elif kind == "signal":

        def signalled_step():
            if trainer.state.iteration == k - 1 and trainer.rank == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
            return step()

        trainer.train_step = signalled_step
    elif kind == "crash_in_save":
        save = dist_checkpointing.save

        def dying_save(state, path, **kwargs):
            if trainer.state.iteration == k:
                save(
                    {key: value for key, value in state.items() if key != "optimizer"}, path
                )  # model written, then death
                raise InjectedCrash(f"killed while saving iteration {k}")
            return save(state, path, **kwargs)

        dist_checkpointing.save = dying_save
    elif kind == "crash_during_async_save":
        _slow_down_async_writers(seconds=2.0)
        _record_complete_checkpoints_at_each_save(trainer)

        def crashing_step():
            if trainer.state.iteration == k:
                raise InjectedCrash(f"killed during iteration {k + 1}")
            return step()

        trainer.train_step = crashing_step
    elif kind == "freeze":

        def freezing_step():
            if trainer.state.iteration == k - 1 and trainer.rank == trainer.world_size - 1:
                os.kill(os.getpid(), signal.SIGSTOP)
            return step()

        trainer.train_step = freezing_step
    elif kind == "nan_loss":
        loss_func = train_module.loss_func

        def poisoned(loss_mask, output_tensor):
            total, count, reduced = loss_func(loss_mask, output_tensor)
            if k == 0 or trainer.state.iteration == k - 1:
                total = total * math.nan
                reduced = reduced.clone()
                reduced[0] = math.nan
            return total, count, reduced

        train_module.loss_func = poisoned


def _slow_down_async_writers(seconds: float) -> None:
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    write = FileSystemWriterAsync.write_preloaded_data_multiproc

    def slow_write(*args, **kwargs):
        time.sleep(seconds)
        return write(*args, **kwargs)

    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(slow_write)


def _record_complete_checkpoints_at_each_save(trainer) -> None:
    from megatron.core import dist_checkpointing

    from formats.torch_dist import complete_iterations

    save = dist_checkpointing.save
    trainer.saves_saw = {}

    def recording_save(*args, **kwargs):
        trainer.saves_saw[trainer.state.iteration] = sorted(complete_iterations(trainer.checkpoints.save_dir))
        return save(*args, **kwargs)

    dist_checkpointing.save = recording_save


def train(rank: int, world_size: int, overrides: list[str], fault=None) -> dict:
    from sft.config import load_config
    from sft.trainer import Trainer

    trainer = Trainer(load_config(None, overrides), "cpu")
    if fault is not None:
        _inject(trainer, fault)
    try:
        result = trainer.train()
    except InjectedCrash as crash:
        return {
            "crashed": str(crash),
            "iteration": trainer.state.iteration,
            "saves_saw": getattr(trainer, "saves_saw", None),
        }
    return {
        "losses": result.losses,
        "iterations": result.iterations_done,
        "stopped": result.stopped_by_signal,
        "skipped": trainer.state.skipped_steps,
        "checkpoint": str(result.last_checkpoint),
    }
