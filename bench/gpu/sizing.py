"""What the GPU stages run at: the sizes of the GPU run and of the CPU rehearsal, the memory budget
that chooses them before anything is allocated, and the packs they train on.

The budget (`budget`): the usable memory (`usable_memory`: the device's free memory, or
BENCH_USABLE_GIB) less a 15% margin must hold the bf16 weights, fp32 gradients, fp32 main weights and
Adam moments (distributed optimizer at DP=1), the activations (plan/planner.py's model) and the logits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from testing.tiny_models import QWEN25_32B_CONFIG

REHEARSAL_USABLE_GIB = 78.0  # on a CPU (--tiny): the sizes are planned as for an H100 80GB

MARGIN = 0.15


class BenchError(Exception):
    """A stage cannot go on (no size fits, ...): recorded as the stage's failure."""


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU (--tiny) rehearsal."""

    matmul: int  # n of the n x n x n bf16 matrix product the env stage times
    seq_length: int
    shard: dict  # HF config fields of the per-GPU shard model (num_hidden_layers from the budget)
    full_width: dict  # HF config fields of the full-width model
    full_width_layers: int
    warmup: int
    iters: int
    max_shard_layers: int


TP = 8  # the recipe's tensor parallelism, whose per-rank shard the shard stage measures

SHAPE = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")

FULL_32B = {**{k: QWEN25_32B_CONFIG[k] for k in SHAPE}, "head_dim": 128}

SHARD_32B = {  # one tensor-parallel-8 rank of Qwen2.5-32B: 5 of the 40 heads, 1 of 8 KV groups, ...
    **FULL_32B,
    **{k: FULL_32B[k] // TP for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")},
    "vocab_size": FULL_32B["vocab_size"] // TP,
}

GPU = Sizes(8192, 32768, SHARD_32B, FULL_32B, full_width_layers=2, warmup=2, iters=5, max_shard_layers=64)

TINY = Sizes(
    256,
    512,
    {**SHARD_32B, "hidden_size": 64, "head_dim": 16, "intermediate_size": 96, "vocab_size": 1024},
    {
        **FULL_32B,
        "hidden_size": 128,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 256,
        "vocab_size": 2048,
    },
    full_width_layers=2,
    warmup=1,
    iters=2,
    max_shard_layers=4,
)


def hf_config(fields: dict, layers: int) -> dict:
    """An HF config.json of Qwen2.5-32B's family with these shapes and layers (bos/eos 0: any vocabulary)."""
    family = {k: v for k, v in QWEN25_32B_CONFIG.items() if k != "torch_dtype"}
    return {**family, "bos_token_id": 0, "eos_token_id": 0, "num_hidden_layers": layers, **fields}


def usable_memory(device: str) -> dict:
    """The GiB the sizes are planned for, and where the figure comes from: BENCH_USABLE_GIB, else the
    device's free memory now (torch.cuda.mem_get_info), else (a CPU rehearsal) an H100's."""
    if os.environ.get("BENCH_USABLE_GIB"):
        return {"gib": float(os.environ["BENCH_USABLE_GIB"]), "source": "BENCH_USABLE_GIB"}
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return {"gib": round(free / 2**30, 2), "source": "torch.cuda.mem_get_info (free)"}
    return {"gib": REHEARSAL_USABLE_GIB, "source": "CPU rehearsal: an H100 80GB's"}


def budget(fields: dict, layers: int, tokens: int, recompute: str, usable_gib: float) -> dict:
    """Estimated GiB of one training step on one GPU (TP1, DP1, distributed optimizer) by the planner's
    model (of Transformer Engine's kernels when TE imports, else of the torch layers), and whether it
    fits the usable memory less the margin."""
    from models.backends import te_available
    from models.registry import arch_from_config
    from plan.layout import ParallelLayout
    from plan.planner import Hardware, estimate

    arch = arch_from_config(hf_config(fields, layers))
    hw = Hardware(gpus=1, gpu_memory_gb=usable_gib * 2**30 / 1e9, buffer_gb=2.0)
    found = estimate(
        arch,
        ParallelLayout(),
        recompute,
        hw,
        tokens,
        1,
        mean_conversation=3000,
        te_available=te_available("cuda"),
    )
    total_gib = found.total_gb * 1e9 / 2**30
    return {
        "gib": round(total_gib, 2),
        "fits": total_gib <= usable_gib * (1 - MARGIN),
        "parts_gb": found.memory_gb,
    }


def largest_fitting_layers(fields: dict, tokens: int, recompute: str, most: int, usable_gib: float) -> int:
    fitting = [n for n in range(1, most + 1) if budget(fields, n, tokens, recompute, usable_gib)["fits"]]
    if not fitting:
        raise BenchError(f"not even one layer fits {usable_gib} GiB less {MARGIN:.0%} at {tokens} tokens")
    return max(fitting)


def reasoning_pack_set(seq_length: int, vocab_size: int, conversations: int, seed: int = 0):
    """Packs of conversations whose lengths follow reasoning traces (log-normal, median 3,000 tokens or
    seq_length / 4), packed by the pipeline's own best fit."""
    from testing.synthetic_packs import packs_from_lengths

    rng = np.random.default_rng(seed)
    median = min(3000, seq_length // 4)
    lengths = np.maximum(rng.lognormal(np.log(median), 1.0, conversations), 64).astype(np.int64)
    return packs_from_lengths(lengths, seq_length, vocab_size, seed=seed)


def lognormal_packs(seq_length: int, vocab_size: int, count: int, seed: int = 0):
    """`count` packs drawn at random (seeded) from a reasoning_pack_set of 16 x count conversations.
    Drawn, not the first ones: best-fit decreasing fills its first packs with the longest conversations
    only, whose attention costs more than a typical pack's."""
    packs = reasoning_pack_set(seq_length, vocab_size, 16 * count, seed)
    if len(packs) < count:
        raise BenchError(f"{len(packs)} packs made, {count} needed")
    drawn = np.random.default_rng([seed, 1]).choice(len(packs), size=count, replace=False)
    return [packs[i] for i in drawn]


def distinct_packs(sizes: Sizes) -> int:
    """Packs in a throughput stage's dataset: one per step up to 64 (the trainer cycles through epochs)."""
    return min(sizes.warmup + sizes.iters + 2, 64)
