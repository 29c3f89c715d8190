"""Per-rank bodies for the trainer tests (run as ranks by common.distributed.run_distributed).

`train(rank, world_size, overrides, fault)` trains with the given config overrides and returns the
per-iteration losses; `train_from_file(rank, world_size, config_file, overrides)` trains as
pretrain_sft.py does under torchrun, from a YAML file and overrides. `fault` injects what a real run
meets, inside the real code path:

- ("crash_after", k): the process dies (an exception escapes) during iteration k + 1;
- ("crash_in_save", k): the save at iteration k dies after writing part of the checkpoint;
- ("crash_during_async_save", k): the background writers are slowed down, and the process dies during
  iteration k + 1 while the checkpoint of iteration k is still being written; the result records which
  checkpoints were complete when each save started;
- ("signal", k): rank 0 receives SIGUSR1 as iteration k starts;
- ("nan_loss", k): the loss of iteration k is NaN (k = 0: every iteration);
- ("record", 0): no fault; the result's "hooks" lists every callback hook the loop called;
- ("freeze", k): the last rank stops (SIGSTOP, as a frozen node: its threads too) at the start of
  iteration k; the others block in the step's first collective;
- ("freeze_in_validation", k): the same, as the validation after iteration k starts.

A list of faults injects each of them. From the test process, `train_tiny_model_at_layouts` trains a
tiny model at several layouts, and `transformers_first_loss` is the reference for its first step.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from pathlib import Path

from sft.callbacks import Callback


class InjectedCrash(RuntimeError):
    pass


class _BeforeStep(Callback):
    """Runs `action(trainer)` before the step that follows iteration `after` (on the ranks it is for)."""

    def __init__(self, after: int, action):
        self.after, self.action = after, action

    def before_step(self, trainer) -> None:
        if trainer.state.iteration == self.after:
            self.action(trainer)


def _crash(k: int):
    def crash(trainer):
        raise InjectedCrash(f"killed during iteration {k + 1}")

    return crash


def _signal(trainer) -> None:
    if trainer.rank == 0:
        os.kill(os.getpid(), signal.SIGUSR1)


def _freeze(trainer) -> None:
    if trainer.rank == trainer.world_size - 1:
        os.kill(os.getpid(), signal.SIGSTOP)


class _Recorder(Callback):
    """Records every hook the loop calls, with the iteration and the step's loss."""

    def __init__(self):
        self.calls = []

    def on_start(self, trainer) -> None:
        self.calls.append(("on_start", trainer.state.iteration))

    def before_step(self, trainer) -> None:
        self.calls.append(("before_step", trainer.state.iteration))

    def after_step(self, trainer, step) -> None:
        self.calls.append(("after_step", trainer.state.iteration, step.loss, step.finite))

    def on_end(self, trainer, failed: bool) -> None:
        self.calls.append(("on_end", trainer.state.iteration, failed))


class _NaNLoss(Callback):
    """A loss function that is NaN at iteration k (k = 0: at every one), and the callback that tells it
    which iteration runs."""

    def __init__(self, k: int):
        self.k, self.iteration = k, 0

    def before_step(self, trainer) -> None:
        self.iteration = trainer.state.iteration

    def __call__(self, loss_mask, output_tensor):
        from sft.train_module import loss_func

        total, count, reduced = loss_func(loss_mask, output_tensor)
        if self.k == 0 or self.iteration == self.k - 1:
            total = total * math.nan
            reduced = reduced.clone()
            reduced[0] = math.nan
        return total, count, reduced


class _FreezeInValidation(Callback):
    def __init__(self, k: int):
        self.k = k

    def before_validation(self, trainer) -> None:
        if trainer.state.iteration == self.k:
            _freeze(trainer)


def _fault_seams(fault) -> tuple[list, dict]:
    """The callbacks and Trainer arguments that inject `fault` through the trainer's own seams
    (("record", 0): none, only a recorder of the hooks)."""
    kind, k = fault
    if kind == "record":
        return [_Recorder()], {}
    if kind in ("crash_after", "crash_during_async_save"):
        return [_BeforeStep(k, _crash(k))], {}
    if kind == "signal":
        return [_BeforeStep(k - 1, _signal)], {}
    if kind == "freeze":
        return [_BeforeStep(k - 1, _freeze)], {}
    if kind == "nan_loss":
        nan_loss = _NaNLoss(k)
        return [nan_loss], {"loss_function": nan_loss}
    if kind == "freeze_in_validation":
        return [_FreezeInValidation(k)], {}
    return [], {}


def _inject_into_megatron_save(trainer, fault) -> None:
    """The faults inside megatron-core's own save, where no seam of ours reaches."""
    from megatron.core import dist_checkpointing

    kind, k = fault
    if kind == "crash_in_save":
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


def _slow_down_async_writers(seconds: float) -> None:
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    write = FileSystemWriterAsync.write_preloaded_data_multiproc

    def slow_write(*args, **kwargs):
        time.sleep(seconds)
        return write(*args, **kwargs)

    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(slow_write)


def _record_complete_checkpoints_at_each_save(trainer) -> None:
    from megatron.core import dist_checkpointing

    from formats.run_files import complete_iterations

    save = dist_checkpointing.save
    trainer.saves_saw = {}

    def recording_save(*args, **kwargs):
        save_dir = trainer.checkpointer.saver.save_dir
        trainer.saves_saw[trainer.state.iteration] = sorted(complete_iterations(save_dir))
        return save(*args, **kwargs)

    dist_checkpointing.save = recording_save


def train(rank: int, world_size: int, overrides: list[str], fault=None) -> dict:
    from sft.config import load_config
    from sft.trainer import Trainer

    faults = fault if isinstance(fault, list) else [] if fault is None else [fault]
    callbacks, seams = [], {}
    for each in faults:
        more_callbacks, more_seams = _fault_seams(each)
        callbacks, seams = [*callbacks, *more_callbacks], {**seams, **more_seams}
    trainer = Trainer(load_config(None, overrides), "cpu", callbacks=callbacks, **seams)
    for each in faults:
        _inject_into_megatron_save(trainer, each)
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
        "hooks": next((c.calls for c in trainer.callbacks if isinstance(c, _Recorder)), None),
    }


def train_from_file(rank: int, world_size: int, config_file: str, overrides: list[str]) -> None:
    from sft.config import load_config
    from sft.trainer import Trainer

    Trainer(load_config(config_file, overrides), "cpu").train()


# Run from the test process ---------------------------------------------------------------------------

TINY_SEQ, TINY_PACKS, TINY_GLOBAL_BATCH = 64, 12, 4


def train_tiny_model_at_layouts(
    root,
    hf,
    layouts: dict[str, tuple[int, list[str]]],
    lr: float = 1e-2,
    iterations: int = 3,
    resumed_from: dict[str, str] | None = None,
):
    """A tiny model's conversion trained `iterations` steps from `hf` at each of `layouts` ({name:
    (processes, overrides)}, in that order; in ROOT/NAME), on 12 random 64-token packs, 4 a step;
    `resumed_from` {name: an earlier run's checkpoint, RUN/iter_N}: copied into the run's directory
    first, the run resumes from it. Returns (its inputs, {name: `train`'s result})."""

    from common.distributed import run_distributed
    from testing.fixtures import training_inputs
    from testing.synthetic_packs import random_packs
    from testing.tiny_models import QWEN25_VOCAB_SIZE_SMALL

    packs = random_packs(TINY_PACKS, TINY_SEQ, QWEN25_VOCAB_SIZE_SMALL, seed=0)
    inputs = training_inputs(root / "train", packs, TINY_SEQ, hf=hf)
    runs = {}
    for name, (world_size, layout) in layouts.items():
        overrides = inputs.overrides(
            root / name,
            f"schedule.global_batch_size={TINY_GLOBAL_BATCH}",
            f"schedule.train_iters={iterations}",
            f"optimizer.lr={lr}",
            "model.recompute=none",
            "checkpoint.save_interval=100",
            *layout,
        )
        if name in (resumed_from or {}):
            checkpoint = Path(root) / resumed_from[name]
            shutil.copytree(checkpoint, Path(root) / name / checkpoint.name)
        runs[name] = run_distributed(train, world_size, overrides, None)[0]
    return inputs, runs


def transformers_first_loss(hf, inputs) -> float:
    """The per-token loss of the first step's packs of `train_tiny_model_at_layouts`, each conversation
    run alone through transformers' class of the model."""
    from sft.data import PackOrder
    from testing.hf_reference import conversation_loss, hf_model

    slots = PackOrder([TINY_PACKS], None, seed=1234).slots(0, TINY_GLOBAL_BATCH)
    conversations = [conv for _, pack in slots for conv in inputs.packs[pack]]
    total, count = conversation_loss(hf_model(hf), conversations)
    return total / count
