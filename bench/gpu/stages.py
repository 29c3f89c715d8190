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
  moe_vs_cpu   train_vs_cpu for a tiny Qwen3 MoE (8 experts, 2 per token): its router, token
               dispatcher and experts on the device (last: the recipe's stages come first)
  summary      gpu_<device>.json in OUTDIR from the newest line of each stage in results.jsonl (lines of
               an earlier run into the same OUTDIR included), for bench/results/

BENCH_ITERS sets the number of timed steps of the throughput stages (default 5 on a GPU, 2 with --tiny).
Sizes come from a memory budget computed before anything is allocated (sizing.py). MFU is against the
device's datasheet peak (common/devices.py). --tiny shrinks every model and row so that all stages run
on a CPU in the suite. The stages live one group per file: stage_env.py, stage_checks.py (train_vs_cpu,
moe_vs_cpu, attention, verify, resume), stage_throughput.py (shard, full_width), stage_summary.py; this
file runs one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the GPU machine runs this from a checkout, with the wheels only

from sizing import GPU, TINY  # noqa: E402
from stage_checks import (  # noqa: E402
    stage_attention,
    stage_moe_vs_cpu,
    stage_resume,
    stage_train_vs_cpu,
    stage_verify,
)
from stage_env import stage_env  # noqa: E402
from stage_summary import stage_summary  # noqa: E402
from stage_throughput import stage_full_width, stage_shard  # noqa: E402


class StageStopped(BaseException):
    """The stage's time limit ran out (run.sh's `timeout` sent SIGTERM): recorded, then the stage ends
    through every `finally` on the way, run_distributed's clean-up of its ranks included."""


def _stop_on_sigterm(signum, frame):
    limit = os.environ.get("BENCH_STAGE_LIMIT")
    raise StageStopped(f"timed out after {limit} s (SIGTERM at the stage's limit)" if limit else "SIGTERM")


def record(out: Path, stage: str, passed: bool, seconds: float, figures: dict) -> None:
    line = {"stage": stage, "pass": passed, "seconds": round(seconds, 2), "figures": figures}
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line, indent=1), flush=True)


STAGES = {
    "env": stage_env,
    "train_vs_cpu": stage_train_vs_cpu,
    "attention": stage_attention,
    "verify": stage_verify,
    "resume": stage_resume,
    "moe_vs_cpu": stage_moe_vs_cpu,
    "shard": stage_shard,
    "full_width": stage_full_width,
    "summary": stage_summary,
}


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
