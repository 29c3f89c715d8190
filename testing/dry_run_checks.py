"""What the dry run's tests compare it with: the CPU allocator's own record of the same run on real tensors.

`allocator_peak(plan)` runs one dry-run rank on real (zero-filled) tensors inside torch's profiler
with memory profiling, and returns the tracker's peak beside the allocator's: the running sum of the
profiler's allocation and free events, in time order, from the rank's construction on. Each call needs
a fresh process (the fake process group and megatron-core's state are per process); `in_fresh_process`
gives one.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor


def _peak_of(profile) -> int:
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in profile.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def allocator_peak(plan) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from sft.dry_run.rank import measure_rank

    recorded = {}
    # oneDNN's bf16 GEMMs on CPUs with AMX take a scratchpad from torch's allocator inside the kernel:
    # a CPU kernel's workspace, which the dry run models on no device; without AMX they take none
    os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE_BF16"  # read at oneDNN's first GEMM, after this

    @contextlib.contextmanager
    def profiled():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield
        recorded["peak"] = _peak_of(prof)

    result = measure_rank(plan, fake=False, around=profiled)
    return {"tracked": result["peak_bytes"], "allocator": recorded["peak"], "parts": result["parts"]}


def in_fresh_process(function, *args):
    """`function(*args)` in a new spawned process; its result."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def measure_in_one_process(plans) -> list[dict]:
    """The dry run of each plan, one after another in one fresh process (cheaper than one each)."""
    return in_fresh_process(_measure_each, plans)


def _measure_each(plans) -> list[dict]:
    from sft.dry_run.rank import measure_rank

    return [measure_rank(plan) for plan in plans]


def write_dry_run_model(directory, family: str = "qwen2", **family_overrides) -> str:
    """A small config.json of `family` whose activations, weights and logits are of comparable size
    (vocabulary 4,096: the dry run's checks need no tokenizer), for the dry run's tests; returns its path."""
    from pathlib import Path

    from testing.tiny_models import tiny_config

    path = Path(directory) / "config.json"
    config = tiny_config(
        family,
        num_layers=4,
        hidden_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=704,
        vocab_size=4096,
        **family_overrides,
    )
    config.bos_token_id = config.eos_token_id = 0
    config.to_json_file(path)
    return str(path)
