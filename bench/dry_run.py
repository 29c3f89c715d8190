#!/usr/bin/env python
"""Benchmark of the dry run on the recipe: `pretrain_sft.py --dry-run` for configs/k2think_qwen2.5_32b.yaml
on 256 GPUs, with Qwen2.5-32B's config.json (no weights, no data: the synthetic rows), as a user runs it on
a login node. Prints the dry run's table, its wall time and the peak memory of its process tree, and how
far the planner's estimate is from the measurement per stage (the target: within 10%).

    .venv/bin/python bench/dry_run.py [--gpus 256] [--json bench/results/dry_run_k2.json] [OVERRIDES]

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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpus", type=int, default=256, help="the job's GPUs (default 256, the recipe's)")
    parser.add_argument("--json", type=Path, help="also write the figures (and the dry run's report) here")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="trainer configuration overrides")
    args = parser.parse_args()

    from testing.tiny_models import QWEN25_32B_CONFIG

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "config.json"
        model.write_text(json.dumps({**QWEN25_32B_CONFIG, "num_hidden_layers": 64}))
        report_file = Path(tmp) / "report.json"
        os.environ.update(K2_INIT_CKPT="", K2_DATA_PREFIX=str(Path(tmp) / "no-data"), K2_SAVE_DIR=tmp)
        command = [
            sys.executable,
            str(ROOT / "pretrain_sft.py"),
            "--config",
            str(ROOT / "configs" / "k2think_qwen2.5_32b.yaml"),
            "--dry-run",
            "--gpus",
            str(args.gpus),
            "--dry-run-json",
            str(report_file),
            "model.init_checkpoint=null",
            f"model.random_init_config={model}",
            *args.overrides,
        ]
        seconds, peak_rss, _, output = run_with_peak_rss(command)
        report = json.loads(report_file.read_text())
    print("\n".join(line for line in output.splitlines() if not line.lstrip().startswith(("warnings.", "/"))))
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
            "wall_s": round(seconds, 1),
            "peak_rss_gb": round(peak_rss / 1e9, 3),
            "report": report,
        }
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
