"""Training checkpoints: torch_dist directories SAVE_DIR/iter_NNNNNNN/ that become visible only when complete.

A checkpoint holds the model weights (the same keys as a converted HF checkpoint, so
tools/convert_mcore_to_hf.py exports any of them), the distributed optimizer's state ('dp_reshardable'
sharding: a run resumes at another data-parallel size, not at another TP/PP; to change those, start a
new run from the weights with model.init_checkpoint=SAVE_DIR/iter_N), the scheduler, the trainer state
(iteration, consumed samples = data position, skip counters) and the resolved configuration; plus
hf_config.json, tokenizer/, config.yaml and provenance.json (versions, git commit, command) next to them.

Atomicity: everything is written to iter_NNNNNNN.partial/ and renamed once all ranks are done; a
partial directory is never picked up (formats.torch_dist.complete_iterations), so a kill during a save
leaves the previous checkpoint as the latest. The training step draws no random numbers (Qwen2.5 has
no dropout), so no RNG state is needed for an exact resume.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from common.errors import CheckpointError, ConfigError
from common.files import partial_path, publish_directory, write_json_atomic
from common.provenance import tool_info
from formats.torch_dist import (
    HF_CONFIG_FILE,
    PROVENANCE_FILE,
    TOKENIZER_DIR,
    complete_iterations,
    iteration_dir_name,
    resolve_checkpoint,
)
from models.parallel_layout import ParallelLayout
from models.weights import assign_weights

log = logging.getLogger(__name__)

# The only sharding type that loads with torch's Adam (docs/architecture.md): it reshards across DP only.
OPTIMIZER_SHARDING = "dp_reshardable"
CONFIG_FILE = "config.yaml"
FINISHED_FILE = (
    "finished.json"  # in SAVE_DIR once every iteration is trained (slurm/sft.sh requeues until then)
)


@dataclass
class TrainState:
    """What besides tensors a resumed run needs to continue exactly."""

    iteration: int = 0
    consumed_samples: int = 0  # the data position: slots of the sample stream already trained on
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0


def unwrap(chunk):
    """The GPTModel inside the DDP and bf16 wrappers, whose state-dict keys are the checkpoint's (the
    wrappers would prefix them with `module.`, which the converters and other layouts do not expect)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(chunk, (DistributedDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk


def _model_key(index: int, count: int) -> str:
    return f"model{index}" if count > 1 else "model"


def model_sharded_state_dict(chunks: list) -> dict[str, Any]:
    """All model chunks' sharded state (one entry per virtual stage; the tensor keys are global)."""
    return {_model_key(i, len(chunks)): unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(chunks)}


def _full_state(
    chunks, optimizer, scheduler, state: TrainState, layout: dict[str, Any], *, loading: bool
) -> dict[str, Any]:
    model = model_sharded_state_dict(chunks)
    return {
        **model,
        "optimizer": optimizer.sharded_state_dict(
            model, is_loading=loading, metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING}
        ),
        "scheduler": scheduler.state_dict(),
        "train_state": asdict(state),
        "layout": layout,
    }


def save_checkpoint(
    save_dir: str | Path,
    chunks,
    optimizer,
    scheduler,
    state: TrainState,
    layout: dict[str, Any],
    config_yaml: str,
    hf_config_file: Path,
    tokenizer_dir: Path | None,
) -> Path:
    """Collective: writes SAVE_DIR/iter_N via iter_N.partial, with the model's HF config as hf_config.json
    and, when the starting checkpoint had one, its tokenizer/."""
    from megatron.core import dist_checkpointing

    final = Path(save_dir) / iteration_dir_name(state.iteration)
    partial = partial_path(final)
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
        partial.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(
        _full_state(chunks, optimizer, scheduler, state, layout, loading=False), str(partial)
    )
    dist.barrier()
    if rank0:
        shutil.copy(hf_config_file, partial / HF_CONFIG_FILE)
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, partial / TOKENIZER_DIR)
        (partial / CONFIG_FILE).write_text(config_yaml)
        write_json_atomic(
            partial / PROVENANCE_FILE,
            {
                **tool_info("pretrain_sft"),
                "iteration": state.iteration,
                "consumed_samples": state.consumed_samples,
                "layout": layout,
            },
        )
        publish_directory(
            partial, final
        )  # a same-iteration checkpoint of an earlier attempt stays until replaced
    dist.barrier()
    return final


def prune_checkpoints(save_dir: str | Path, keep_last_n: int | None) -> list[Path]:
    """Rank 0: deletes all but the newest `keep_last_n` complete checkpoints; returns what it deleted."""
    if keep_last_n is None:
        return []
    iterations = complete_iterations(save_dir)
    doomed = [iterations[i] for i in sorted(iterations)[:-keep_last_n]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


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


def _torch_adams(optimizer) -> list:
    import torch

    inner = [
        getattr(chained, "optimizer", None)
        for chained in getattr(optimizer, "chained_optimizers", [optimizer])
    ]
    return [o for o in inner if isinstance(o, (torch.optim.Adam, torch.optim.AdamW))]


def _materialise_torch_adam_state(optimizer) -> None:
    """torch's Adam (megatron-core's fallback without TE or apex) creates its per-parameter state at the
    first step; megatron-core's loader reads that state to build the structure it loads into, so a fresh
    optimizer gets zero state first (the moments are then overwritten by the load; see _restore_adam_step)."""
    import torch

    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for param in group["params"]:
                if not adam.state[param]:
                    adam.state[param].update(
                        step=torch.tensor(0.0),
                        exp_avg=torch.zeros_like(param),
                        exp_avg_sq=torch.zeros_like(param),
                    )


def _restore_adam_step(optimizer, successful_steps: int) -> None:
    """torch's Adam keeps its bias-correction step count per parameter; megatron-core's 'dp_reshardable'
    loader writes back the template's value (0) after restoring the moments, so it is set here from the
    scheduler, which advances exactly on the successful optimizer steps."""
    import torch

    for adam in _torch_adams(optimizer):
        for state in adam.state.values():
            state["step"] = torch.tensor(float(successful_steps))


def load_checkpoint(
    path: Path, chunks, optimizer, scheduler, layout: ParallelLayout, world_size: int
) -> TrainState:
    """Collective: restores model, optimizer, scheduler and trainer state saved by `save_checkpoint`."""
    import torch
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(path))
    saved_layout = common.get("layout")
    if saved_layout is None or "train_state" not in common:
        raise CheckpointError(
            f"{path} is not a training checkpoint (no trainer state): to start from its weights, "
            f"set model.init_checkpoint={path} and checkpoint.resume=none"
        )
    changed = layout.model_parallel_changes(saved_layout)
    if changed:
        raise ConfigError(
            f"{path} was saved at another model-parallel layout {changed} (saved, now); the optimizer "
            "state reshards only across data parallelism. Resume with the saved layout, or start a new "
            f"run from the weights: model.init_checkpoint={path} checkpoint.resume=none"
        )
    _materialise_torch_adam_state(optimizer)
    template = _full_state(
        chunks, optimizer, scheduler, TrainState(), layout.to_dict(world_size), loading=True
    )
    state = dist_checkpointing.load(template, str(path))
    for i, chunk in enumerate(chunks):
        assign_weights(unwrap(chunk), state[_model_key(i, len(chunks))], path)
    # Under no_grad, or torch refuses the in-place copy into views of leaves that require grad.
    with torch.no_grad():
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _restore_adam_step(optimizer, scheduler.num_steps)
    return TrainState(**state["train_state"])
