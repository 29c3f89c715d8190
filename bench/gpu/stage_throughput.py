"""The throughput stages: the recipe's per-GPU shard (shard) and full-width layers beside transformers
(full_width), each with its peak memory, the dry run of the same shapes, and a profile of one step
split into attention, GEMMs and the rest."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from harness import ROOT
from sizing import (
    MARGIN,
    BenchError,
    Sizes,
    budget,
    distinct_packs,
    hf_config,
    largest_fitting_layers,
    lognormal_packs,
    usable_memory,
)

from sft.metrics import read_metrics


def _throughput_overrides(
    prefix, config_file: Path, save_dir: Path, sizes: Sizes, device: str, recompute: str
):
    return [
        f"data.prefixes=[{prefix}]",
        f"model.random_init_config={config_file}",
        f"checkpoint.save_dir={save_dir}",
        f"data.seq_length={sizes.seq_length}",
        "schedule.global_batch_size=1",
        f"schedule.train_iters={sizes.warmup + sizes.iters + 1}",
        "checkpoint.save_interval=1000000",
        "checkpoint.save_at_end=false",
        f"model.recompute={recompute}",
        f"device={device}",
        "schedule.warmup_ratio=0",
        "logging.tensorboard=false",
    ]


def _measure_trainer(rank: int, world_size: int, overrides: list[str], warmup: int, iters: int, device: str):
    """Per-rank: trains warmup + iters steps (metrics to the run's JSONL), then profiles one more."""
    from torch.profiler import ProfilerActivity, profile

    from sft.config import load_config
    from sft.trainer import Trainer

    with Trainer(load_config(None, overrides), device) as trainer:
        for _ in range(warmup + iters):
            trainer.step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        try:
            with profile(activities=activities) as prof:
                trainer.step()
        except Exception as exc:  # e.g. CUPTI refused by a sandboxed driver: the timed steps still count
            return {"error": f"the profiler failed: {type(exc).__name__}: {exc}"}
    return profile_split(prof, device)


def measure_ours(
    work: Path, name: str, fields: dict, layers: int, sizes: Sizes, device: str, recompute: str, packs
) -> dict:
    """Throughput and peak memory of the trainer (one process) on `packs`, after `sizes.warmup` steps."""
    from common.distributed import run_distributed
    from models.packed_attention import packed_attention_kernel
    from testing.synthetic_packs import write_packed_dataset

    config_file = work / f"{name}-config.json"
    config_file.write_text(json.dumps(hf_config(fields, layers)))
    prefix = write_packed_dataset(
        work / f"{name}-data" / "packs", packs, sizes.seq_length, fields["vocab_size"]
    )
    save_dir = work / f"{name}-run"
    overrides = _throughput_overrides(prefix, config_file, save_dir, sizes, device, recompute)
    (split,) = run_distributed(
        _measure_trainer, 1, overrides, sizes.warmup, sizes.iters, device, device=device
    )
    records = read_metrics(save_dir / "metrics.jsonl")[0]
    timed = records[sizes.warmup : sizes.warmup + sizes.iters]
    dry = dry_run_peak(overrides, work / f"{name}-dry-run.json")
    seconds = sum(r["step_time_s"] for r in timed)
    tflops = sum(r["tflops_per_device"] * r["step_time_s"] for r in timed) / seconds
    return {
        "layers": layers,
        "seq_length": sizes.seq_length,
        "recompute": recompute,
        "attention": packed_attention_kernel(device),
        "tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
        "tflops_per_gpu": tflops,
        "mfu": sum(r["mfu"] * r["step_time_s"] for r in timed) / seconds,  # the trainer's (common/devices)
        "peak_mem_gb": max(r["peak_memory_gb"] for r in timed),  # torch.cuda.max_memory_allocated, GiB
        "dry_run": dry,  # the same shapes measured on fake tensors (TE-like kernels), GiB
        "losses": [r["loss"] for r in timed],
        "profile": split,
    }


def dry_run_peak(overrides: list[str], report_file: Path, timeout: float = 180) -> dict:
    """`pretrain_sft.py --dry-run` of the same run (on the CPU, fake tensors): its peak in GiB beside the
    GPU's torch.cuda.max_memory_allocated, so the first GPU run tells how close the dry run is. Its
    failure is recorded, not raised: it is no reason to lose the stage's figures."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cpu_overrides = [o for o in overrides if not o.startswith("device=")]
    cmd = [sys.executable, str(ROOT / "pretrain_sft.py"), "--dry-run", "--gpus", "1"]
    cmd += ["--dry-run-json", str(report_file), *cpu_overrides]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        (rank,) = json.loads(report_file.read_text())["ranks"]
    except Exception as exc:  # a figure beside the measurement, never the stage's failure
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return {
        "peak_gib": round(rank["peak_gb"] * 1e9 / 2**30, 3),
        "parts_gb": rank["parts_gb"],
        "exit_status": done.returncode,
    }


def stage_shard(args, sizes: Sizes, work: Path) -> tuple[bool, dict]:
    recompute, memory = "none", usable_memory(args.device)
    layers = largest_fitting_layers(
        sizes.shard, sizes.seq_length, recompute, sizes.max_shard_layers, memory["gib"]
    )
    packs = lognormal_packs(sizes.seq_length, sizes.shard["vocab_size"], distinct_packs(sizes))
    figures = measure_ours(work, "shard", sizes.shard, layers, sizes, args.device, recompute, packs)
    figures["usable_memory"] = memory
    figures["budget"] = budget(sizes.shard, layers, sizes.seq_length, recompute, memory["gib"])
    return all(np.isfinite(figures["losses"])), figures


def _measure_transformers(
    rank: int, world_size: int, config: dict, prefix: str, warmup: int, iters: int, device: str
) -> dict:
    """Per-rank: the family's transformers model (random weights, fp32 master weights, bf16 autocast,
    fused AdamW, the same per-token loss) on the same packs, packed through position ids."""
    import transformers

    from models.registry import family_for_config
    from plan.layout import ParallelLayout
    from sft.data import SFTData

    # The GPU image has no flash-attn package. With SDPA, position ids that restart at each conversation
    # and no attention mask, transformers (masking_utils.find_packed_sequence_indices) builds a
    # block-diagonal causal mask of the row: an SDPA with an explicit mask, which runs no flash kernel.
    attention = "sdpa"
    attention_ran = "torch SDPA with a block-diagonal mask built from position ids (no flash kernel)"
    on_gpu = device == "cuda"
    family = family_for_config(config)
    model_class = getattr(transformers, family.hf_model_class)
    config_class = getattr(transformers, family.hf_config_class)
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    with torch.device(device):
        model = model_class(config_class(**fields, attn_implementation=attention)).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=on_gpu)
    data = SFTData([prefix], None, seed=0)
    times, tokens = [], []
    for step in range(warmup + iters):
        batch = data.micro_batches(step, 1, ParallelLayout(), 0, 1)[0].to(device)
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=on_gpu):
            logits = model(input_ids=batch.tokens, position_ids=batch.position_ids).logits
        losses = torch.nn.functional.cross_entropy(logits[0].float(), batch.labels[0], reduction="none")
        loss = (losses * batch.loss_mask[0]).sum() / batch.loss_mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
            tokens.append(batch.real_tokens)
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    return {"attention": attention_ran, "tokens_per_s": sum(tokens) / sum(times), "peak_mem_gb": peak}


def stage_full_width(args, sizes: Sizes, work: Path) -> tuple[bool, dict]:
    from common.distributed import run_distributed

    recompute, layers, vocab = "none", sizes.full_width_layers, sizes.full_width["vocab_size"]
    memory = usable_memory(args.device)
    for tokens in (sizes.seq_length, sizes.seq_length // 2, sizes.seq_length // 4, sizes.seq_length // 8):
        # transformers keeps fp32 weights, gradients and moments plus autocast's bf16 weight copies (18 bytes
        # per parameter, like ours) and one more fp32 copy of the logits (the gradient of the fp32 loss input)
        ours = budget(sizes.full_width, layers, tokens, recompute, memory["gib"])
        transformers_gib = ours["gib"] + tokens * vocab * 4 / 2**30
        if ours["fits"] and transformers_gib <= memory["gib"] * (1 - MARGIN):
            break
    else:
        raise BenchError(f"full-width layers fit {memory['gib']} GiB at no token count tried")
    width = dataclasses.replace(sizes, seq_length=tokens)
    packs = lognormal_packs(tokens, sizes.full_width["vocab_size"], distinct_packs(sizes))
    figures = measure_ours(work, "full", sizes.full_width, layers, width, args.device, recompute, packs)
    figures["usable_memory"] = memory
    figures["budget"] = budget(sizes.full_width, layers, tokens, recompute, memory["gib"])
    (hf,) = run_distributed(
        _measure_transformers,
        1,
        hf_config(sizes.full_width, layers),
        str(work / "full-data" / "packs"),
        sizes.warmup,
        sizes.iters,
        args.device,
        device=args.device,
    )
    figures["transformers"] = hf
    figures["speedup_vs_transformers"] = figures["tokens_per_s"] / hf["tokens_per_s"]
    return all(np.isfinite(figures["losses"])), figures


def _classify(name: str) -> str:
    lowered = name.lower()
    if any(k in lowered for k in ("flash", "fmha", "attn", "attention", "sdpa", "varlen")):
        return "attention"
    gemm_names = (
        "gemm",
        "matmul",
        "cutlass",
        "xmma",
        "nvjet",
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "cublas",
    )
    return "gemm" if any(k in lowered for k in gemm_names) else "other"


def profile_split(profiler, device: str, top: int = 8) -> dict:
    """Seconds of kernel (CUDA) or op self time (CPU) per class, and the top kernels."""
    split, kernels = {"attention": 0.0, "gemm": 0.0, "other": 0.0}, []
    for event in profiler.key_averages():
        if device == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            seconds = event.self_device_time_total / 1e6
        else:
            seconds = event.self_cpu_time_total / 1e6
        split[_classify(event.key)] += seconds
        kernels.append((seconds, event.key[:80]))
    found = {
        "split_s": split,
        "top": [{"name": k, "s": round(s, 4)} for s, k in sorted(kernels, reverse=True)[:top]],
    }
    if not kernels:
        found["error"] = f"the profiler recorded no {device} events (on a GPU: CUPTI unavailable?)"
    return found
