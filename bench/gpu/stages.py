#!/usr/bin/env python
"""The stages of bench/gpu/run.sh: the trainer's first contact with a GPU, checked and measured.

    python bench/gpu/stages.py STAGE --out OUTDIR [--device cuda|cpu] [--tiny]

Each call runs one stage and appends one JSON line {"stage", "pass", "seconds", "figures"} to
OUTDIR/results.jsonl the moment it ends, failed or not, and also when its time limit's SIGTERM stops it
(bench/gpu/run.sh gives every stage its own process, log and time limit, so a crash or time-out loses
nothing already measured). Stages:

  env          GPU, driver, torch, CUDA, Python, megatron-core, the attention/norm paths chosen, the
               memory the sizes are planned for, the datasheet peak, and the measured rate of a bf16
               matrix product (8192^3 on a GPU): the ceiling MFU is also reported against
  train_vs_cpu a tiny Qwen2 (the real 151,936 vocabulary) converted from HF: 3 training steps in bf16 on
               the device against the same 3 steps in fp32 on the CPU (a child process that sees no
               GPU), per-step loss within a stated bf16 tolerance
  attention    the packed attention on the device (bf16) against per-conversation attention in fp32;
               and, on a torch whose varlen attention takes no enable_gqa, whether its flash kernel
               takes unrepeated GQA K/V (recorded, never failing the stage)
  verify       tools/verify_conversion.py on the device against transformers
  resume       save at iteration 2, resume, and continue with the uninterrupted run's losses
  shard        throughput of the recipe's per-GPU shard: Qwen2.5-32B layers as one tensor-parallel-8
               rank holds them (hidden 5120; 5 query heads, 1 KV head, FFN 3456; the vocabulary shard),
               as many layers as the memory budget allows, random initialisation on the device, on
               packs drawn at random from a packed set of reasoning-trace lengths
  full_width   throughput of full-width Qwen2.5-32B layers at a token count that fits, and of
               transformers' Qwen2 on the same layers and packs
  summary      gpu_<device>.json in OUTDIR from the newest line of each stage in results.jsonl (lines of
               an earlier run into the same OUTDIR included), for bench/results/

BENCH_ITERS sets the number of timed steps of the throughput stages (default 5 on a GPU, 2 with --tiny).
Sizes come from a memory budget computed before anything is allocated (`budget`): the usable memory
(`usable_memory`: the device's free memory, or BENCH_USABLE_GIB) less a 15% margin must hold the bf16
weights, fp32 gradients, fp32 main weights and Adam moments (distributed optimizer at DP=1), the
activations (sft/planner.py's model) and the logits. MFU is against the device's datasheet peak
(common/devices.py). --tiny shrinks every model and row so that all stages run on a CPU in the suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.devices import RECIPE_ACCELERATOR, find_accelerator, peak_tflops  # noqa: E402
from sft.metrics import read_metrics  # noqa: E402
from testing.tiny_models import QWEN25_32B_CONFIG  # noqa: E402

REHEARSAL_USABLE_GIB = 78.0  # on a CPU (--tiny): the sizes are planned as for an H100 80GB
MARGIN = 0.15
BF16_LOSS_RTOL = 0.02  # bf16 weights/activations vs fp32 after 3 steps of a tiny model
ATTENTION_RTOL = 0.02  # bf16 packed attention vs fp32, relative to the largest reference value
RESUME_RTOL = 1e-3  # a resumed GPU run vs the uninterrupted one (cuBLAS/atomics non-determinism)


class BenchError(Exception):
    """A stage cannot go on (no size fits, ...): recorded as the stage's failure."""


class StageStopped(BaseException):
    """The stage's time limit ran out (run.sh's `timeout` sent SIGTERM): recorded, then the stage ends
    through every `finally` on the way, run_distributed's clean-up of its ranks included."""


def _stop_on_sigterm(signum, frame):
    limit = os.environ.get("BENCH_STAGE_LIMIT")
    raise StageStopped(f"timed out after {limit} s (SIGTERM at the stage's limit)" if limit else "SIGTERM")


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


# The memory budget ------------------------------------------------------------------------------------


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
    from models.parallel_layout import ParallelLayout
    from models.registry import arch_from_config
    from sft.planner import Hardware, estimate

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


# Shared pieces --------------------------------------------------------------------------------------


def record(out: Path, stage: str, passed: bool, seconds: float, figures: dict) -> None:
    line = {"stage": stage, "pass": passed, "seconds": round(seconds, 2), "figures": figures}
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line, indent=1), flush=True)


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


def pretrain(overrides: list[str], *, cpu_only: bool = False, timeout: float = 600) -> list[float]:
    """Runs pretrain_sft.py (one process) and returns its per-iteration losses from metrics.jsonl."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = (
            ""  # megatron-core's CPU redirection refuses to run where CUDA is visible
        )
    cmd = [sys.executable, str(ROOT / "pretrain_sft.py"), *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    sys.stderr.write(done.stderr[-6000:])
    if done.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} exited {done.returncode}")
    save_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("checkpoint.save_dir="))
    return [r["loss"] for r in read_metrics(Path(save_dir) / "metrics.jsonl")[0]]


def tiny_inputs(work: Path, seq_length: int = 256):
    """A tiny Qwen2 (the real vocabulary) converted from HF, and random packs: made by the first stage
    that needs them, reused by the later ones (each stage is its own process)."""
    from testing.fixtures import TrainingInputs, training_inputs
    from testing.synthetic_packs import random_packs
    from testing.tiny_models import QWEN25_VOCAB_SIZE_SMALL

    root = work / "tiny"
    if (root / "data" / "packs_meta.json").is_file():
        return TrainingInputs(root / "hf", root / "mcore", root / "data" / "packs", seq_length, packs=[])
    return training_inputs(root, random_packs(8, seq_length, QWEN25_VOCAB_SIZE_SMALL, seed=0), seq_length)


def _relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


# Stages -------------------------------------------------------------------------------------------


def stage_env(args, sizes: Sizes, work: Path) -> tuple[bool, dict]:
    from importlib import metadata

    from models.backends import choose_backend
    from models.packed_attention import packed_attention_kernel

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    name = device_name(args.device)
    accelerator = find_accelerator(name) if args.device == "cuda" else None
    figures = {
        "device": name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "megatron_core": version("megatron-core"),
        "transformers": version("transformers"),
        "layers": choose_backend(args.device).describe(),
        "packed_attention": packed_attention_kernel(args.device),
        "usable_memory": usable_memory(args.device),
        "datasheet_peak_tflops": peak_tflops(name if args.device == "cuda" else None),
        "datasheet_peak_of": accelerator.name if accelerator else f"{RECIPE_ACCELERATOR.name} (unlisted)",
        "matmul_bf16_tflops": matmul_tflops(args.device, sizes.matmul),
    }
    if args.device == "cuda":
        figures["driver"] = nvidia_smi("--query-gpu=driver_version,memory.total", "--format=csv,noheader")
        figures["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return figures["megatron_core"] is not None, figures


def nvidia_smi(*arguments: str) -> str | None:
    """nvidia-smi's answer, or None where it is missing or fails (a sandboxed driver may lack it)."""
    try:
        done = subprocess.run(["nvidia-smi", *arguments], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def matmul_tflops(device: str, n: int, warmup: int = 3, timed: int = 10) -> float:
    """The measured rate of an n x n x n bf16 matrix product on random data: the ceiling a GEMM-bound
    step can reach here (the datasheet peak is not reached by any real kernel)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(warmup):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(timed):
        a @ b
    synchronize(device)
    tflops = 2 * n**3 * timed / (time.perf_counter() - start) / 1e12
    return float(f"{tflops:.4g}")  # significant digits: a loaded CPU's rate would round to 0.00


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def stage_train_vs_cpu(args, sizes: Sizes, work: Path) -> tuple[bool, dict]:
    inputs = tiny_inputs(work)
    common = [
        "schedule.global_batch_size=2",
        "schedule.train_iters=3",
        "schedule.warmup_ratio=0",
        "optimizer.lr=1e-3",
        "checkpoint.save_at_end=false",
        "checkpoint.save_interval=100",
    ]
    # bf16 on the device (as training runs there), fp32 on the CPU: the reference. In the CPU rehearsal
    # the "device" is the CPU too, still in bf16, so that the same comparison is rehearsed.
    device = pretrain(
        inputs.overrides(work / "steps-device", *common, f"device={args.device}", "model.precision=bf16")
    )
    cpu = pretrain(
        inputs.overrides(work / "steps-cpu", *common, "device=cpu", "model.precision=fp32"), cpu_only=True
    )
    diff = _relative(device, cpu)
    return diff <= BF16_LOSS_RTOL, {
        "compared": f"bf16 on {args.device} against fp32 on the CPU",
        "device_bf16_losses": device,
        "cpu_fp32_losses": cpu,
        "max_rel_diff": diff,
        "tolerance": BF16_LOSS_RTOL,
    }


def stage_attention(args, sizes: Sizes, work: Path) -> tuple[bool, dict]:
    from models.packed_attention import packed_attention_kernel, packed_causal_attention

    torch.manual_seed(0)
    lengths = [700, 3000, 1, 29, 4000] if not args.tiny else [70, 300, 1, 29, 40]
    heads, groups, dim = 40, 8, 128
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    q = torch.randn(sum(lengths), heads, dim)
    k, v = torch.randn(sum(lengths), groups, dim), torch.randn(sum(lengths), groups, dim)
    reference = torch.empty_like(q)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):  # fp32, one conversation at a time
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        reference[start:end] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=dim**-0.5, enable_gqa=True
        ).transpose(0, 1)
    ours = (
        packed_causal_attention(
            *(t.to(args.device, torch.bfloat16) for t in (q, k, v)),
            cu.to(args.device),
            max(lengths),
            dim**-0.5,
        )
        .float()
        .cpu()
    )
    error = float((ours - reference).abs().max() / reference.abs().max())
    context_parallel = context_parallel_chunks_error(lengths, heads, groups, dim, args.device)
    passed = error <= ATTENTION_RTOL and context_parallel["max_rel_error_bf16"] <= ATTENTION_RTOL
    return passed, {
        "kernel": packed_attention_kernel(args.device),
        "max_rel_error_bf16": error,
        "tolerance": ATTENTION_RTOL,
        "unrepeated_gqa": unrepeated_gqa(q, k, v, cu, max(lengths), dim**-0.5, args.device),
        "context_parallel": context_parallel,
    }


def context_parallel_chunks_error(lengths: list[int], heads: int, groups: int, dim: int, device: str) -> dict:
    """The context-parallel attention's kernel on one device: each CP rank's query chunks (CP4, the
    conversations padded to multiples of 8) against the whole row's keys and values, in bf16, against
    the fp32 per-conversation attention on the CPU at the same positions (the all-gather around it is
    proven on CPU by tests/test_sft_data.py)."""
    from formats.packed import padded_lengths
    from models.packed_attention import (
        ContextParallelChunks,
        attend_query_chunks,
        packed_attention_kernel,
        packed_causal_attention,
    )
    from sft.data import context_parallel_indices

    cp = 4
    padded = padded_lengths(lengths, 2 * cp)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(padded)]), dtype=torch.int32)
    torch.manual_seed(1)
    q = torch.randn(int(cu[-1]), heads, dim)
    k, v = torch.randn(int(cu[-1]), groups, dim), torch.randn(int(cu[-1]), groups, dim)
    reference = packed_causal_attention(q, k, v, cu, int(padded.max()), dim**-0.5)
    error = 0.0
    for rank in range(cp):
        index = torch.from_numpy(context_parallel_indices(cu.numpy(), cp, rank))
        chunks = ContextParallelChunks.build(cu, cp, rank)
        ours = attend_query_chunks(
            q.index_select(0, index).to(device, torch.bfloat16),
            *(t.to(device, torch.bfloat16) for t in (k, v)),
            chunks,
            dim**-0.5,
        )
        expected = reference.index_select(0, index)
        error = max(error, float((ours.float().cpu() - expected).abs().max() / expected.abs().max()))
    return {
        "kernel": packed_attention_kernel(device, cp),
        "context_parallel": cp,
        "max_rel_error_bf16": error,
    }


def unrepeated_gqa(q, k, v, cu, max_seqlen: int, scale: float, device: str) -> dict:
    """Where torch's varlen attention takes no `enable_gqa` (torch 2.11), the trainer repeats K/V to the
    query heads. Whether its flash kernel takes the fewer K/V heads as they are, forward and backward,
    with the same result (a saving to measure next), recorded and never failing the stage."""
    from models.packed_attention import _varlen_attention

    varlen = _varlen_attention() if device == "cuda" else None
    if varlen is None or varlen[2]:
        return {"checked": False, "why": "no varlen attention here" if varlen is None else "takes enable_gqa"}
    varlen_attn, repeat = varlen[0], q.shape[1] // k.shape[1]
    try:
        inputs = [t.to(device, torch.bfloat16).requires_grad_() for t in (q, k, v)]
        repeated = [inputs[0], *(t.repeat_interleave(repeat, dim=1) for t in inputs[1:])]
        cu32 = cu.to(device, torch.int32)
        results = []
        for query, key, value in (inputs, repeated):
            out = varlen_attn(
                query, key, value, cu32, cu32, max_seqlen, max_seqlen, scale=scale, window_size=(-1, 0)
            )
            grads = torch.autograd.grad(out.float().square().sum(), inputs)
            results.append((out.detach().float(), *(g.float() for g in grads)))
        errors = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(*results, strict=True)]
        return {"checked": True, "max_rel_error_out_dq_dk_dv": errors}
    except Exception as exc:  # the answer is the point: a kernel that refuses it says so here
        return {"checked": True, "error": f"{type(exc).__name__}: {exc}"[:500]}


def stage_verify(args, sizes: Sizes, work: Path) -> tuple[bool, dict]:
    inputs = tiny_inputs(work)
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "verify_conversion.py"),
        "--hf",
        str(inputs.hf),
        "--mcore",
        str(inputs.mcore),
        "--device",
        args.device,
        "--atol",
        "1e-3",
        "--seq-length",
        "128",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    sys.stderr.write(done.stderr[-4000:])
    return done.returncode == 0, {
        "output": done.stdout.strip().splitlines()[-1:],
        "exit_status": done.returncode,
    }


def stage_resume(args, sizes: Sizes, work: Path) -> tuple[bool, dict]:
    import shutil

    inputs = tiny_inputs(work)
    common = [
        "schedule.global_batch_size=2",
        "schedule.train_iters=4",
        "optimizer.lr=1e-3",
        "checkpoint.save_interval=2",
        "checkpoint.keep_last_n=null",
        f"device={args.device}",
    ]
    whole = pretrain(inputs.overrides(work / "resume-whole", *common))
    (work / "resume-again").mkdir()
    shutil.copytree(work / "resume-whole" / "iter_0000002", work / "resume-again" / "iter_0000002")
    resumed = pretrain(inputs.overrides(work / "resume-again", *common))  # resume=auto: from iteration 2
    diff = _relative(resumed, whole[2:])
    return len(resumed) == 2 and diff <= RESUME_RTOL, {
        "uninterrupted": whole,
        "resumed_3_4": resumed,
        "max_rel_diff": diff,
        "tolerance": RESUME_RTOL,
    }


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

    from models.parallel_layout import ParallelLayout
    from models.registry import family_for_config
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


def stage_summary(args, sizes: Sizes, work: Path) -> tuple[bool, dict]:
    """gpu_<device>.json from the newest line of each stage: a rerun of some stages (STAGES=...) into the
    same OUTDIR replaces their earlier lines and keeps the others'."""
    lines = [json.loads(line) for line in (args.out / "results.jsonl").read_text().splitlines()]
    by_stage = {line["stage"]: line for line in lines if line["stage"] != "summary"}  # the newest wins
    env = by_stage.get("env", {}).get("figures", {})
    keys = ("layers", "seq_length", "attention", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_mem_gb")

    def throughput(stage: str) -> dict | None:
        if stage not in by_stage or "tflops_per_gpu" not in by_stage[stage]["figures"]:
            return None
        figures = by_stage[stage]["figures"]
        found = {k: figures.get(k) for k in keys}
        found["budget_gib"] = figures["budget"]["gib"]  # the planner's figure beside peak_mem_gb
        found["dry_run_gib"] = figures.get("dry_run", {}).get("peak_gib")  # the dry run's, likewise
        if env.get("matmul_bf16_tflops"):  # against the ceiling measured here, beside the datasheet's
            found["mfu_of_measured_matmul"] = figures["tflops_per_gpu"] / env["matmul_bf16_tflops"]
        return found

    summary = {
        "device": env.get("device", device_name(args.device)),
        "command": os.environ.get("BENCH_COMMAND", "bench/gpu/run.sh"),
        "date": time.strftime("%Y-%m-%d"),
        "datasheet_peak_tflops": env.get("datasheet_peak_tflops"),
        "matmul_bf16_tflops": env.get("matmul_bf16_tflops"),
        "usable_memory": env.get("usable_memory"),
        "checks": {
            name: {"pass": by_stage[name]["pass"], "figures": by_stage[name]["figures"]}
            for name in ("train_vs_cpu", "attention", "verify", "resume")
            if name in by_stage
        },
        "shard": throughput("shard"),
        "full_width": throughput("full_width"),
        "stages": {
            name: {"pass": line["pass"], "seconds": line["seconds"]} for name, line in by_stage.items()
        },
    }
    if summary["full_width"] is not None:
        full = by_stage["full_width"]["figures"]
        summary["full_width"].update(
            transformers_tokens_per_s=full["transformers"]["tokens_per_s"],
            transformers_attention=full["transformers"]["attention"],
            speedup_vs_transformers=full["speedup_vs_transformers"],
        )
    name = "".join(c if c.isalnum() else "_" for c in summary["device"].lower()).strip("_")
    (args.out / f"gpu_{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    passed = [line["pass"] for line in by_stage.values()]
    return all(passed), {"file": f"gpu_{name}.json", "stages_passed": sum(passed), "stages": len(passed)}


STAGES = {
    "env": stage_env,
    "train_vs_cpu": stage_train_vs_cpu,
    "attention": stage_attention,
    "verify": stage_verify,
    "resume": stage_resume,
    "shard": stage_shard,
    "full_width": stage_full_width,
    "summary": stage_summary,
}


# Profiling ------------------------------------------------------------------------------------------


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


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=sorted(STAGES), help="the stage to run (see above)")
    parser.add_argument(
        "--out", type=Path, required=True, help="the run's output directory (results.jsonl, logs)"
    )
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="where to run (default cuda)"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models and rows: rehearse every stage on a CPU"
    )
    args = parser.parse_args()
    from common.logging_utils import setup_logging

    setup_logging()
    sizes = TINY if args.tiny else GPU
    if os.environ.get("BENCH_ITERS"):
        sizes = dataclasses.replace(sizes, iters=int(os.environ["BENCH_ITERS"]))
    work = Path(os.environ.get("BENCH_WORK") or args.out / "work")  # run.sh: a scratch directory
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        passed, figures = STAGES[args.stage](args, sizes, work)
    except BaseException as exc:  # recorded (a time-out and an exit too), then re-raised for the log
        record(
            args.out,
            args.stage,
            False,
            time.perf_counter() - start,
            {"error": f"{type(exc).__name__}: {exc}"},
        )
        raise
    record(args.out, args.stage, passed, time.perf_counter() - start, figures)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
