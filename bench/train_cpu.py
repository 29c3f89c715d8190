#!/usr/bin/env python
"""Benchmark of the trainer on CPU processes (gloo); prints figures (not a test), so regressions show.

A tiny Qwen2.5-architecture model (random weights, the real 151,936-token vocabulary, converted with
tools' converter) trains on synthetic packs through the real code path (sft.trainer.Trainer: packed
attention, pipeline schedule, distributed optimizer, checkpointing off until the end) at several
layouts of 1, 2 and 4 processes. For each: tokens/s (real tokens, the first iteration excluded as
warm-up), step time, and the peak resident memory of the largest rank.

    .venv/bin/python bench/train_cpu.py [--seq-length 512] [--iters 6] [--layers 4] [--json OUT]

Note that CPU figures depend on cores: with fewer cores than processes, more processes run slower.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = {  # name: (processes, overrides)
    "1 process": (1, []),
    "DP2": (2, []),
    "TP2": (2, ["parallel.tensor=2"]),
    "PP2": (2, ["parallel.pipeline=2"]),
    "DP4": (4, []),
    "TP2xPP2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
}


def _rank_body(rank: int, world_size: int, overrides: list[str]) -> dict:
    from sft.config import load_config
    from sft.trainer import Trainer

    trainer = Trainer(load_config(ROOT / "configs" / "tiny_cpu.yaml", overrides), "cpu")
    trainer.train()
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> int:
    from sft.metrics import read_metrics

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-length", type=int, default=512, help="packed sequence length (default 512)")
    parser.add_argument("--iters", type=int, default=6, help="training iterations per layout (default 6)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the tiny model (default 4)")
    parser.add_argument("--global-batch", type=int, default=8, help="packs per iteration (default 8)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()

    from common.distributed import run_distributed
    from common.logging_utils import setup_logging
    from testing.fixtures import training_inputs
    from testing.synthetic_packs import random_packs
    from testing.tiny_models import QWEN25_VOCAB_SIZE_SMALL

    setup_logging()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        packs = random_packs(args.global_batch * args.iters, args.seq_length, QWEN25_VOCAB_SIZE_SMALL, seed=0)
        inputs = training_inputs(work, packs, args.seq_length, layers=args.layers)
        for name, (processes, extra) in LAYOUTS.items():
            save_dir = work / name.replace(" ", "_")
            overrides = inputs.overrides(
                save_dir,
                f"schedule.global_batch_size={args.global_batch}",
                f"schedule.train_iters={args.iters}",
                f"checkpoint.save_interval={args.iters}",
                *extra,
            )
            start = time.perf_counter()
            per_rank = run_distributed(_rank_body, processes, overrides)
            wall = time.perf_counter() - start
            records = read_metrics(save_dir / "metrics.jsonl")[0][1:]
            tokens = sum(r["tokens"] for r in records)
            seconds = sum(r["step_time_s"] for r in records)
            rows.append(
                {
                    "layout": name,
                    "processes": processes,
                    "tokens_per_s": tokens / seconds,
                    "step_time_s": seconds / len(records),
                    "peak_rss_gb_max_rank": max(r["peak_rss_gb"] for r in per_rank),
                    "wall_s": wall,
                }
            )
    print(
        f"\ntiny Qwen2 ({args.layers} layers, hidden 64, vocab {QWEN25_VOCAB_SIZE_SMALL}), seq "
        f"{args.seq_length}, "
        f"global batch {args.global_batch}, {args.iters} iterations, {os.cpu_count()} CPU cores"
    )
    print(f"{'layout':<10} {'procs':>5} {'tokens/s':>10} {'step s':>8} {'peak RSS GB':>12} {'wall s':>8}")
    for r in rows:
        print(
            f"{r['layout']:<10} {r['processes']:>5} {r['tokens_per_s']:>10.0f} {r['step_time_s']:>8.2f} "
            f"{r['peak_rss_gb_max_rank']:>12.2f} {r['wall_s']:>8.1f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(),
                    "settings": vars(args) | {"json": str(args.json)},
                    "results": rows,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
