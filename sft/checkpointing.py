"""Training checkpoints: torch_dist directories SAVE_DIR/iter_NNNNNNN/ that become visible only when complete.

A checkpoint holds the model weights (the same keys as a converted HF checkpoint, so
tools/convert_mcore_to_hf.py exports any of them), the distributed optimizer's state (per data-parallel
shard by default, 'dp_reshardable': a run resumes at another data/context-parallel size, not at another
TP/PP/EP; per parameter with checkpoint.reshardable_optimizer, 'fully_reshardable': at any layout), the
scheduler, the trainer state (iteration, consumed samples = data position, skip counters) and the
resolved configuration; plus hf_config.json, tokenizer/, config.yaml, training_data.json (the chat
template the data was encoded with and its enable_thinking setting, which the export installs) and
provenance.json (versions, git commit, command) next to them.

Atomicity: everything is written to iter_NNNNNNN.partial/ and renamed once all ranks are done; a
partial directory is never picked up (formats.torch_dist.complete_iterations), so a kill during a save
leaves the previous checkpoint as the latest. The training step draws no random numbers (Qwen2.5 has
no dropout, nor do the other families), so no RNG state is needed for an exact resume.

At scale (checkpoint.async_save) the tensors are copied to host memory and written by a background
process per rank while training goes on; megatron-core's AsyncCallsQueue reports when every rank's
writer has finished, and only then are the metadata written and the directory renamed (CheckpointSaver).
With checkpoint.fully_parallel_save the data/context-parallel replicas of a shard split its writing.
Old checkpoints are renamed out of sight at once and deleted by a background thread. When a checkpoint
is taken is the checkpointer's (sft/checkpointer.py); what it holds besides tensors includes the
callbacks' state (`Callback.state_dict`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import multiprocessing as mp
import os
import queue
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing.managers import BaseProxy, SyncManager
from pathlib import Path
from typing import Any

import torch.distributed as dist

from common.distributed import die_with_parent
from common.errors import CheckpointError, ConfigError
from common.files import partial_path, publish_directory, write_json_atomic
from common.provenance import tool_info
from formats.run_files import (
    HF_CONFIG_FILE,
    PROVENANCE_FILE,
    TOKENIZER_DIR,
    TRAINING_DATA_FILE,
    complete_iterations,
    iteration_dir_name,
)
from formats.torch_dist import resolve_checkpoint
from models.weights import load_strategy
from plan.layout import ParallelLayout

from .train_module import DP_RESHARDABLE, FULLY_RESHARDABLE, TrainModule

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
# in SAVE_DIR once every iteration is trained (slurm/sft.sh requeues until then)
FINISHED_FILE = "finished.json"
_DELETING = ".deleting-"  # a retired checkpoint's name while a background thread deletes it


@dataclass
class TrainState:
    """What besides tensors a resumed run needs to continue exactly."""

    iteration: int = 0
    consumed_samples: int = 0  # the data position: slots of the sample stream already trained on
    skipped_steps: int = 0


def _full_state(
    module: TrainModule,
    state: TrainState,
    layout: dict[str, Any],
    callbacks: dict[str, Any],
    *,
    loading: bool,
    optimizer_sharding: str | None = None,
) -> dict[str, Any]:
    sharding = optimizer_sharding or module.optimizer_sharding
    return {
        **module.sharded_state_dict(loading=loading, optimizer_sharding=sharding),
        "optimizer_sharding": sharding,
        "train_state": asdict(state),
        "layout": layout,
        "callbacks": callbacks,
    }


class CheckpointSaver:
    """Writes SAVE_DIR/iter_N checkpoints; collective: every rank calls every method, in the same order.

    `save` is synchronous unless `async_save`: then it returns once this rank's tensors are staged in
    host memory, and `poll` (between iterations) or `wait` publishes the checkpoint after all ranks'
    writers finished. A save first waits for the previous one, so at most one is in flight."""

    def __init__(
        self,
        save_dir: str | Path,
        *,
        keep_last_n: int | None,
        async_save: bool,
        fully_parallel_save: bool,
        parallel_group,
        hf_config_file: Path,
        tokenizer_dir: Path | None,
        config_yaml: str,
        training_data: dict[str, Any],
    ):
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
        from megatron.core.dist_checkpointing.strategies.fully_parallel import (
            FullyParallelSaveStrategyWrapper,
        )

        self.save_dir = Path(save_dir)
        self.keep_last_n = keep_last_n
        # Read now: they may come from the checkpoint the run resumed from, which keep_last_n retires.
        self._run_files = {
            HF_CONFIG_FILE: Path(hf_config_file).read_bytes(),
            CONFIG_FILE: config_yaml.encode(),
            TRAINING_DATA_FILE: json.dumps(training_data, indent=2).encode(),
        }
        if tokenizer_dir is not None:
            self._run_files.update(
                (f"{TOKENIZER_DIR}/{f.relative_to(tokenizer_dir)}", f.read_bytes())
                for f in sorted(Path(tokenizer_dir).rglob("*"))
                if f.is_file()
            )
        self._rank0 = dist.get_rank() == 0
        strategy = get_default_save_sharded_strategy()
        self._strategy = (
            FullyParallelSaveStrategyWrapper(strategy, parallel_group) if fully_parallel_save else strategy
        )
        self._queue = AsyncCallsQueue() if async_save else None
        install_write_results_queue(async_save)
        self._published: list[Path] = []
        self._deleter = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-delete") if self._rank0 else None
        if self._rank0 and self.save_dir.is_dir():
            # deletions that a previous run did not finish
            for leftover in self.save_dir.glob(f"*{_DELETING}*"):
                self._deleter.submit(shutil.rmtree, leftover, ignore_errors=True)

    def save(
        self, module: TrainModule, state: TrainState, layout: dict[str, Any], callbacks: dict[str, Any]
    ) -> Path:
        """Starts (async) or writes (sync) the checkpoint of `state.iteration` (`callbacks`: their state by
        name); returns its final path."""
        from megatron.core import dist_checkpointing

        self.wait()
        started = time.monotonic()
        final = self.save_dir / iteration_dir_name(state.iteration)
        partial = partial_path(final)
        if self._rank0:
            self._discard(partial)  # left by a save that was killed
            partial.mkdir(parents=True)
        dist.barrier()
        request = dist_checkpointing.save(
            _full_state(module, state, layout, callbacks, loading=False),
            str(partial),
            sharded_strategy=self._strategy,
            async_sharded_save=self._queue is not None,
        )
        provenance = {**asdict(state), "layout": layout}
        if request is None:
            self._publish(final, provenance, started)
            return final
        request.add_finalize_fn(functools.partial(self._publish, final, provenance, started))
        self._queue.schedule_async_request(request)
        if self._rank0:
            log.info(
                "checkpoint of iteration %d staged in %.1f s; writing in the background",
                state.iteration,
                time.monotonic() - started,
            )
        return final

    def poll(self) -> list[Path]:
        """Publishes the checkpoint in flight if every rank's writer has finished; returns what it
        published. Cheap (one all-reduce) while a save is in flight, free otherwise."""
        if self._queue is not None and self._queue.get_num_unfinalized_calls():
            self._queue.maybe_finalize_async_calls(blocking=False)
        published, self._published = self._published, []
        return published

    def wait(self) -> list[Path]:
        """Blocks until the checkpoint in flight (if any) is published; returns what was published."""
        if self._queue is not None and self._queue.get_num_unfinalized_calls():
            self._queue.maybe_finalize_async_calls(blocking=True)
        return self.poll()

    def close(self, *, abort: bool = False) -> None:
        """Publishes what is in flight, or with `abort` (a failing run, whose other ranks may be gone)
        kills this rank's writer without any collective, leaving iter_N.partial behind."""
        if self._queue is not None:
            self._queue.close(abort=abort)
        if self._deleter is not None:
            self._deleter.shutdown(wait=not abort)

    def _publish(self, final: Path, provenance: dict[str, Any], started: float) -> None:
        """Collective, once every rank's tensors are written: rank 0 adds the run's files, renames
        iter_N.partial to iter_N and retires old checkpoints."""
        partial = partial_path(final)
        if self._rank0:
            for name, content in self._run_files.items():
                (partial / name).parent.mkdir(parents=True, exist_ok=True)
                (partial / name).write_bytes(content)
            write_json_atomic(partial / PROVENANCE_FILE, {**tool_info("pretrain_sft"), **provenance})
            # a same-iteration checkpoint of an earlier attempt stays until replaced
            publish_directory(partial, final)
            log.info("saved %s (%.1f s after the save started)", final, time.monotonic() - started)
            self._retire_old_checkpoints()
        dist.barrier()
        self._published.append(final)

    def _retire_old_checkpoints(self) -> None:
        if self.keep_last_n is None:
            return
        iterations = complete_iterations(self.save_dir)
        for iteration in sorted(iterations)[: -self.keep_last_n]:
            log.info("removing old checkpoint %s (keep_last_n=%d)", iterations[iteration], self.keep_last_n)
            self._discard(iterations[iteration])

    def _discard(self, path: Path) -> None:
        """Rank 0: renames `path` out of sight at once (no longer a checkpoint to anyone) and deletes it
        in the background, so that removing a checkpoint's terabyte never holds up the step loop."""
        if not path.exists():
            return
        doomed = path.with_name(f"{path.name}{_DELETING}{uuid.uuid4().hex[:8]}")
        os.replace(path, doomed)
        self._deleter.submit(shutil.rmtree, doomed, ignore_errors=True)


def find_resume_checkpoint(resume: str, save_dir: str | Path | None) -> Path | None:
    """The checkpoint to resume from: `auto` = latest complete one in save_dir (None if there is none),
    `none` = never, anything else = a checkpoint or run directory."""
    if resume == "none":
        return None
    if resume == "auto":
        if save_dir is None or not Path(save_dir).is_dir() or not complete_iterations(save_dir):
            return None
        return resolve_checkpoint(save_dir)
    return resolve_checkpoint(resume)


def check_resumable(path: Path, layout: ParallelLayout) -> tuple[dict[str, Any], str]:
    """The common (non-tensor) state of checkpoint `path` and how its optimizer state is sharded; raises
    CheckpointError when it is not a training checkpoint, ConfigError when it cannot resume at `layout`.
    Reads one small file: the pre-flight check calls it before anything heavy starts."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(path))
    saved_layout = common.get("layout")
    if saved_layout is None or "train_state" not in common:
        raise CheckpointError(
            f"{path} is not a training checkpoint (no trainer state): to start from its weights, "
            f"set model.init_checkpoint={path} and checkpoint.resume=none"
        )
    # Checkpoints from before the choice existed hold no name: they are per data-parallel shard.
    sharding = common.get("optimizer_sharding", DP_RESHARDABLE)
    changed = layout.weight_sharding_changes(saved_layout)
    if changed and sharding != FULLY_RESHARDABLE:
        raise ConfigError(
            f"{path} was saved at another tensor/pipeline/expert layout {changed} (saved, now) with its "
            "optimizer state per data-parallel shard, which reshards across data and context parallelism "
            "only. Resume with the saved sizes, or start a new run from the weights: "
            f"model.init_checkpoint={path} checkpoint.resume=none (a run saved with "
            "checkpoint.reshardable_optimizer=true resumes at any layout)"
        )
    return common, sharding


def load_checkpoint(
    path: Path, module: TrainModule, layout: ParallelLayout, world_size: int, parallel_group=None
) -> tuple[TrainState, dict[str, Any]]:
    """Collective: restores the module's state (model, optimizer, scheduler) saved by `CheckpointSaver`
    and returns the trainer state and the callbacks' states; with a `parallel_group`
    (data/context-parallel replicas) the replicas split the reading."""
    from megatron.core import dist_checkpointing

    common, sharding = check_resumable(path, layout)
    template = _full_state(
        module, TrainState(), layout.to_dict(world_size), {}, loading=True, optimizer_sharding=sharding
    )
    state = dist_checkpointing.load(template, str(path), sharded_strategy=load_strategy(path, parallel_group))
    if sharding == FULLY_RESHARDABLE:
        # Its tensors are per parameter, but the rest (parameter groups, how many chained optimizers)
        # is the saving layout's and only its first rank's: this layout's own is kept.
        state["optimizer"] = _template_with_loaded_tensors(template["optimizer"], state["optimizer"])
    module.load_state_dict(state, path)
    fields = {f.name for f in dataclasses.fields(TrainState)}
    train_state = TrainState(**{k: v for k, v in state["train_state"].items() if k in fields})
    return train_state, common.get("callbacks") or {}


def _template_with_loaded_tensors(template: Any, loaded: Any) -> Any:
    """The template's tree (megatron-core's optimizer state nests dicts; its lists hold settings only)
    with each of its sharded leaves replaced by the loaded value at the same place and its other leaves
    kept as they are."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    if isinstance(template, ShardedBase):
        return loaded
    if isinstance(template, dict):
        loaded = loaded if isinstance(loaded, dict) else {}
        return {k: _template_with_loaded_tensors(v, loaded.get(k)) for k, v in template.items()}
    return template


def install_write_results_queue(async_save: bool):
    """megatron-core's file writer hands its results back through one module-level queue, which it makes
    from a spawned multiprocessing manager on the first save: a fresh interpreter, seconds on every
    rank of every run. A synchronous save puts and gets in this process, so an in-process queue serves
    it; an asynchronous one puts from its background writer, so it gets a manager's queue, from a
    manager whose server dies with this rank (megatron-core's outlives a rank killed with SIGKILL: an
    OOM kill, a dying node; no finalizer runs). Installed once per process (an asynchronous saver
    replaces an in-process queue); returns it."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    current = filesystem_async._results_queue
    if async_save and not isinstance(current, BaseProxy):
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=die_with_parent)
        filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive
    elif current is None:
        filesystem_async._results_queue = queue.Queue()
    return filesystem_async._results_queue
