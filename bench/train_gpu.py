#!/usr/bin/env python
"""GPU benchmark of the trainer against transformers on the same packed batch; prints figures (not a test).

Workload: Qwen2.5-32B's exact layer shapes (hidden 5120, FFN 27648, 40 heads, 8 KV groups, qkv bias,
vocabulary 152064, untied) with --layers layers (as many as fit one GPU for a full training step),
random weights (std 0.02) written as an HF snapshot and converted with the project's converter, and
packed --seq-length rows whose conversation lengths are log-normal (median 3,000 tokens, like
reasoning traces), packed by the pipeline's best fit.

1. megatron-core through the trainer's real code path (sft.trainer.Trainer: THD packing, our packed
   attention or Transformer Engine's, distributed optimizer, bf16 with fp32 main weights), one GPU,
   one pack per step: tokens/s, model TFLOP/s and MFU (attention counted per conversation), peak
   memory; then one profiled step, its GPU time split into attention, GEMMs and the rest.
2. transformers' Qwen2ForCausalLM from the same snapshot, same packs (packed through position ids;
   flash_attention_2 when installed, else SDPA), AdamW (fused), bf16 autocast over fp32 weights (what
   the recipe's HF Trainer ran), the same per-token loss: tokens/s and peak memory; the ratio.
3. --check: the packed attention on the GPU against the CPU per-conversation reference (bf16), and a
   2-step run of the tiny model on the GPU against the same run on CPU (losses, bf16 tolerance).

    python bench/train_gpu.py --layers 2 --json bench/results/train_gpu_h100.json     # on an H100
    python bench/train_gpu.py --tiny --device cpu                                     # harness check on CPU

--tiny swaps in a 2-layer, 64-wide model and 1,024-token rows, so the whole harness runs on a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.qwen2.arch import Qwen2Arch  # noqa: E402

PEAK_TFLOPS = 989.0


def _classify(name: str) -> str:
    lowered = name.lower()
    if any(k in lowered for k in ("flash", "fmha", "attn", "attention", "sdpa", "varlen")):
        return "attention"
    if any(
        k in lowered
        for k in (
            "gemm",
            "matmul",
            "cutlass",
            "xmma",
            "nvjet",
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::linear",
            "cublas",
        )
    ):
        return "gemm"
    return "other"


def time_split(profiler, device: str) -> dict[str, float]:
    """Seconds of kernel (CUDA) or op self time (CPU) per class: attention, GEMMs, the rest."""
    split = {"attention": 0.0, "gemm": 0.0, "other": 0.0}
    for event in profiler.key_averages():
        if device == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            micros = event.self_device_time_total
        else:
            micros = event.self_cpu_time_total
        split[_classify(event.key)] += micros / 1e6
    return split


def _megatron_rank(
    rank: int, world_size: int, overrides: list[str], warmup: int, iters: int, device: str
) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from sft.config import load_config
    from sft.trainer import Trainer

    trainer = Trainer(load_config(None, overrides), device)
    for _ in range(warmup + iters):
        trainer.train_step()  # metrics go to the run's JSONL
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        trainer.train_step()
    trainer.metrics.close()
    return {"split_s": time_split(prof, device)}


def _transformers_rank(
    rank: int,
    world_size: int,
    hf_dir: str,
    prefix: str,
    warmup: int,
    iters: int,
    device: str,
    checkpointing: bool,
) -> dict:
    from transformers import Qwen2ForCausalLM

    from models.parallel_layout import ParallelLayout
    from sft.data import SFTData

    try:
        import flash_attn  # noqa: F401

        attention = "flash_attention_2"
    except ImportError:
        attention = "sdpa"
    on_gpu = device == "cuda"
    model = Qwen2ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation=attention).to(
        device
    )
    if checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=on_gpu
    )
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
    return {"attention": attention, "tokens_per_s": sum(tokens) / sum(times), "peak_mem_gb": peak}


def _prepare(work: Path, args):
    """The 32B-shaped (or, with --tiny, tiny) HF model, its conversion and log-normal packs."""
    from testing.fixtures import training_inputs
    from testing.synthetic_packs import packs_from_lengths
    from testing.tiny_models import QWEN25_VOCAB_SIZE_SMALL, write_qwen25_32b_shaped

    hf, vocab_size = None, QWEN25_VOCAB_SIZE_SMALL
    if not args.tiny:
        hf = write_qwen25_32b_shaped(work / "hf", args.layers, std=0.02)
        vocab_size = Qwen2Arch.from_path(hf).vocab_size
    rng = np.random.default_rng(0)
    lengths = np.maximum(
        rng.lognormal(np.log(min(3000, args.seq_length // 4)), 1.0, 40 * (args.warmup + args.iters + 1)), 64
    ).astype(np.int64)
    packs = packs_from_lengths(lengths, args.seq_length, vocab_size, seed=0)
    return training_inputs(work, packs, args.seq_length, hf=hf, layers=args.layers)


def _two_step_losses(rank: int, world_size: int, overrides: list[str], device: str) -> list[float]:
    from sft.config import load_config
    from sft.trainer import Trainer

    return list(Trainer(load_config(None, overrides), device).train().losses.values())


def run_checks(device: str, work: Path) -> dict:
    """Packed attention on `device` (bf16) vs the CPU per-conversation reference (fp32); and a 2-step
    run of a tiny model on `device` vs the same run on CPU."""
    from common.distributed import run_distributed
    from testing.fixtures import training_inputs
    from testing.synthetic_packs import random_packs
    from testing.tiny_models import QWEN25_VOCAB_SIZE_SMALL

    checks = _attention_check(device)
    tiny = training_inputs(work / "tiny", random_packs(4, 256, QWEN25_VOCAB_SIZE_SMALL), 256)
    losses = {}
    for where in dict.fromkeys([device, "cpu"]):
        overrides = tiny.overrides(
            work / f"tiny-run-{where}",
            "schedule.global_batch_size=2",
            "schedule.train_iters=2",
            "schedule.warmup_ratio=0",
            "optimizer.lr=1e-3",
            f"device={where}",
        )
        (losses[where],) = run_distributed(_two_step_losses, 1, overrides, where, device=where)
    checks["two_step_losses"] = losses
    checks["two_step_max_rel_diff"] = max(
        abs(a - b) / abs(b) for a, b in zip(losses[device], losses["cpu"], strict=True)
    )
    return checks


def _attention_check(device: str) -> dict:
    from models.qwen2.attention import _per_segment_sdpa, packed_causal_attention

    torch.manual_seed(0)
    lengths = [700, 3000, 1, 29, 4000]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    q, k, v = (
        torch.randn(sum(lengths), 40, 128),
        torch.randn(sum(lengths), 8, 128),
        torch.randn(sum(lengths), 8, 128),
    )
    reference = _per_segment_sdpa(q, k, v, cu, 128**-0.5)
    ours = (
        packed_causal_attention(
            *(t.to(device, torch.bfloat16) for t in (q, k, v)), cu.to(device), max(lengths), 128**-0.5
        )
        .float()
        .cpu()
    )
    return {"packed_attention_max_abs_diff_bf16": float((ours - reference).abs().max())}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--layers", type=int, default=2, help="decoder layers of the 32B-shaped stack (default 2)"
    )
    parser.add_argument("--seq-length", type=int, default=32768, help="packed row length (default 32768)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument(
        "--backends", default="torch,te", help="attention back-ends to measure, of torch,te (default both)"
    )
    parser.add_argument(
        "--recompute",
        default="selective",
        choices=["none", "selective", "full"],
        help="activation recomputation of the megatron-core run (default selective)",
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny model and 1,024-token rows: checks the harness on CPU"
    )
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    parser.add_argument(
        "--hf-gradient-checkpointing",
        action="store_true",
        help="recompute activations in the transformers baseline too (when it does not fit otherwise)",
    )
    parser.add_argument(
        "--check", action="store_true", help="also run the numerical checks against the CPU reference"
    )
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args()
    if args.tiny:
        args.seq_length = min(args.seq_length, 1024)

    from common.distributed import run_distributed
    from common.logging_utils import setup_logging
    from models.backends import te_available

    setup_logging()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    results = {
        "device": device_name,
        "command": shlex.join(["python", *sys.argv]),
        "layers": args.layers,
        "seq_length": args.seq_length,
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = _prepare(work, args)
        for backend in args.backends.split(","):
            if backend == "te" and not te_available(args.device):
                print(f"backend te: Transformer Engine is not importable on {args.device}; skipped")
                continue
            save_dir = work / f"run-{backend}"
            overrides = inputs.overrides(
                save_dir,
                "schedule.global_batch_size=1",
                f"schedule.train_iters={args.warmup + args.iters + 1}",
                "checkpoint.save_interval=1000000",
                "checkpoint.save_at_end=false",
                f"model.attention={backend}",
                f"model.recompute={args.recompute}",
                f"device={args.device}",
                "schedule.warmup_ratio=0",
            )
            (profile,) = run_distributed(
                _megatron_rank, 1, overrides, args.warmup, args.iters, args.device, device=args.device
            )
            records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
            timed = records[args.warmup : args.warmup + args.iters]
            seconds = sum(r["step_time_s"] for r in timed)
            tokens = sum(r["tokens"] for r in timed)
            tflops = sum(r["tflops_per_device"] * r["step_time_s"] for r in timed) / seconds
            results["runs"].append(
                {
                    "backend": backend,
                    "tokens_per_s": tokens / seconds,
                    "tflops_per_gpu": tflops,
                    "mfu": tflops / PEAK_TFLOPS,
                    "peak_mem_gb": max(r["peak_memory_gb"] for r in timed),
                    "time_split_s": profile["split_s"],
                    "losses": [r["loss"] for r in timed],
                }
            )
        if not args.no_transformers:
            (hf_result,) = run_distributed(
                _transformers_rank,
                1,
                str(inputs.hf),
                str(inputs.prefix),
                args.warmup,
                args.iters,
                args.device,
                args.hf_gradient_checkpointing,
                device=args.device,
            )
            results["transformers"] = hf_result
            for run in results["runs"]:
                run["speedup_vs_transformers"] = run["tokens_per_s"] / hf_result["tokens_per_s"]
        if args.check:
            results["checks"] = run_checks(args.device, work)
    print(json.dumps(results, indent=2))
    if args.json:
        best = max(results["runs"], key=lambda r: r["tokens_per_s"])
        summary = {k: results[k] for k in ("device", "command", "layers", "seq_length")}
        summary.update({k: best[k] for k in ("tokens_per_s", "tflops_per_gpu", "mfu", "peak_mem_gb")})
        summary.update(
            backend=best["backend"],
            speedup_vs_transformers=best.get("speedup_vs_transformers"),
            details=results,
        )
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
