#!/usr/bin/env python
"""Benchmark of the dry run on a shipped config: `pretrain_sft.py --dry-run` for the recipe
(configs/k2think_qwen2.5_32b.yaml on 256 GPUs, with Qwen2.5-32B's config.json) or the other families'
configs (Qwen3-32B on 256 GPUs, Llama 3.1 8B on 8, Qwen3-30B-A3B on 32), no weights and no data (the
synthetic rows), as a user runs it on a login node. Prints the dry run's table, its wall time and the
peak memory of its process tree, and how far the planner's estimate is from the measurement per stage
(the target: within 10%).

    .venv/bin/python bench/dry_run.py [--model qwen2.5-32b] [--gpus N] \
        [--json bench/results/dry_run_k2.json] [OVERRIDES]

OVERRIDES are trainer overrides for other layouts (e.g. parallel.pipeline=16 parallel.context=2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.measure import run_with_peak_rss  # noqa: E402
from testing.tiny_models import (  # noqa: E402
    LLAMA31_8B_CONFIG,
    QWEN3_30B_A3B_CONFIG,
    QWEN3_32B_CONFIG,
    QWEN25_32B_CONFIG,
)

# --model -> (its config.json, the shipped trainer config, the GPUs that config is laid out for)
MODELS = {
    "qwen2.5-32b": ({**QWEN25_32B_CONFIG, "num_hidden_layers": 64}, "k2think_qwen2.5_32b.yaml", 256),
    "qwen3-32b": (QWEN3_32B_CONFIG, "k2think_qwen3_32b.yaml", 256),
    "llama3.1-8b": (LLAMA31_8B_CONFIG, "llama3.1_8b.yaml", 8),
    "qwen3-30b-a3b": (QWEN3_30B_A3B_CONFIG, "qwen3_30b_a3b.yaml", 32),
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", choices=list(MODELS), default="qwen2.5-32b", help="the model and its shipped config"
    )
    parser.add_argument(
        "--gpus", type=int, default=None, help="the job's GPUs (default: the config's, 256 or 8 for Llama)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures (and the dry run's report) here")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="trainer configuration overrides")
    args = parser.parse_args()

    hf_config, trainer_config, gpus = MODELS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "config.json"
        model.write_text(json.dumps(hf_config))
        report_file = Path(tmp) / "report.json"
        # as a user runs it: the model's directory (only its config.json), the data and save paths unset
        os.environ["K2_INIT_CKPT"] = tmp
        for name in ("K2_DATA_PREFIX", "K2_SAVE_DIR"):
            os.environ.pop(name, None)
        command = [
            sys.executable,
            str(ROOT / "pretrain_sft.py"),
            "--config",
            str(ROOT / "configs" / trainer_config),
            "--dry-run",
            "--gpus",
            str(args.gpus or gpus),
            "--dry-run-json",
            str(report_file),
            *args.overrides,
        ]
        seconds, peak_rss, _, output = run_with_peak_rss(command)
        report = json.loads(report_file.read_text())
    print(output.rstrip())
    print(
        f"\nwall {seconds:.1f} s, peak memory of the process tree {peak_rss / 1e9:.2f} GB, "
        f"{os.cpu_count()} cores"
    )
    for rank in report["ranks"]:
        off = rank["estimate_gb"] / rank["peak_gb"] - 1
        print(
            f"rank {rank['rank']} (stage {rank['pipeline_stage']}): measured {rank['peak_gb']:.2f} GB, "
            f"planner {rank['estimate_gb']:.2f} GB ({100 * off:+.1f}%), {rank['seconds']:.0f} s"
        )
    if args.json:
        figures = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "model": args.model,
            "wall_s": round(seconds, 1),
            "peak_rss_gb": round(peak_rss / 1e9, 3),
            "report": report,
        }
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
