"""Model weights from a torch_dist checkpoint, at whatever layout it was saved.

megatron-core reads, for each rank, the stored chunks that overlap its shard of every tensor, so a
checkpoint saved (or converted) at one tensor/pipeline layout loads at any other. Transformer Engine's
`_extra_state` entries (FP8 scaling state) are not model weights and are left as initialised.

    load_weights(model_chunks, "ckpt/qwen2.5-32b-mcore")   # collective over all ranks

With a `parallel_group` (the data- and context-parallel replicas of this rank's shard), the replicas
split the reading and exchange the parts by broadcast (megatron-core's fully-parallel load) instead of
each reading the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.errors import CheckpointError

_EXTRA_STATE = "_extra_state"


def weights_sharded_state_dict(model) -> dict[str, Any]:
    """The model's sharded state dict without TE's `_extra_state` entries."""
    return {k: v for k, v in model.sharded_state_dict().items() if not k.endswith(_EXTRA_STATE)}


def assign_weights(model, state: dict[str, Any], source: str | Path) -> None:
    """Puts loaded tensors into `model`; every weight must be present and nothing else."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    problems = [k for k in missing if not k.endswith(_EXTRA_STATE)] + list(unexpected)
    if problems:
        raise CheckpointError(f"{source}: the weights do not match the model: {problems[:5]}")


def load_strategy(checkpoint_dir: str | Path, parallel_group=None):
    """megatron-core's load strategy for `checkpoint_dir`; wrapped so that the ranks of `parallel_group`
    (replicas of the same shards) each read a share, when a group is given."""
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    strategy = get_default_load_sharded_strategy(str(checkpoint_dir))
    return strategy if parallel_group is None else FullyParallelLoadStrategyWrapper(strategy, parallel_group)


def load_weights(models, checkpoint_dir: str | Path, parallel_group=None) -> None:
    """Loads this rank's part of the weights of `models` (a model, or this rank's list of virtual-pipeline
    chunks, loaded in one collective call: megatron-core checks that the ranks together read every
    stored layer)."""
    from megatron.core import dist_checkpointing

    models = models if isinstance(models, (list, tuple)) else [models]
    sharded = {f"chunk{i}": weights_sharded_state_dict(model) for i, model in enumerate(models)}
    strategy = load_strategy(checkpoint_dir, parallel_group)
    state = dist_checkpointing.load(sharded, str(checkpoint_dir), sharded_strategy=strategy)
    for i, model in enumerate(models):
        assign_weights(model, state[f"chunk{i}"], checkpoint_dir)
