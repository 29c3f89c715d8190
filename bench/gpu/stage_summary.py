"""The summary stage: gpu_<device>.json for bench/results/ from the newest line of each stage."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from harness import device_name
from sizing import Sizes
from stage_checks import CHECKS


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
            for name in CHECKS
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
