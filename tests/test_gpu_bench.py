"""bench/gpu/run.sh rehearsed on the CPU with tiny sizes: every stage runs, passes its check and records
its figures, and the summary has the fields the GPU report needs (so the script cannot rot between GPU
runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["env", "train_vs_cpu", "attention", "verify", "resume", "shard", "full_width", "summary"]


@pytest.mark.slow
def test_every_stage_runs_and_records_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "BENCH_WORK": str(tmp_path / "work")}
    done = subprocess.run(
        [str(ROOT / "bench" / "gpu" / "run.sh"), str(out), "--device", "cpu", "--tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = (out / "stages.log").read_text() if (out / "stages.log").exists() else ""
    assert done.returncode == 0, done.stdout + log[-4000:]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in results] == STAGES and all(r["pass"] for r in results), results
    assert sorted(p.name for p in out.iterdir()) == ["gpu_cpu.json", "results.jsonl", "stages.log"]  # no data
    summary = json.loads((out / "gpu_cpu.json").read_text())
    assert set(summary) >= {"device", "command", "date", "checks", "shard", "full_width"}
    assert set(summary["checks"]) == {"train_vs_cpu", "attention", "verify", "resume"}
    for part in ("shard", "full_width"):
        figures = summary[part]
        assert {"layers", "seq_length", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_mem_gb"} <= set(
            figures
        )
        assert figures["tokens_per_s"] > 0 and 0 < figures["mfu"] < 1
    assert summary["full_width"]["transformers_tokens_per_s"] > 0
    shard = next(r for r in results if r["stage"] == "shard")["figures"]
    assert shard["budget"]["fits"] and shard["profile"]["split_s"]["gemm"] > 0


def test_the_budget_chooses_sizes_that_fit_an_h100():
    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    from stages import GPU, MARGIN, USABLE_GIB, budget, largest_fitting_layers

    layers = largest_fitting_layers(GPU.shard, GPU.seq_length, "none", GPU.max_shard_layers)
    assert budget(GPU.shard, layers, GPU.seq_length, "none")["gib"] <= USABLE_GIB * (1 - MARGIN)
    assert not budget(GPU.shard, layers + 1, GPU.seq_length, "none")["fits"]
    # the logits of the recipe's full 152K vocabulary at 32K tokens alone are tens of GB (bf16 + fp32)
    full = budget(GPU.full_width, 2, 32768, "none")
    assert full["parts_gb"]["logits"] > 25 and not full["fits"]
