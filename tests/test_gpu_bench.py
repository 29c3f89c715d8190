"""bench/gpu/run.sh rehearsed on the CPU with tiny sizes: every stage runs, passes its check and records
its figures, and the summary has the fields the GPU report needs (so the script cannot rot between GPU
runs); a stage stopped at its limit records why and leaves no process behind; the deadline skips what it
cannot fit and a rerun of some stages merges with the earlier lines; a machine without megatron-core is
told so at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = [
    "env",
    "train_vs_cpu",
    "attention",
    "verify",
    "resume",
    "shard",
    "full_width",
    "moe_vs_cpu",
    "summary",
]
RUN_SH = str(ROOT / "bench" / "gpu" / "run.sh")


def _results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


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
    assert set(summary["checks"]) == {"train_vs_cpu", "moe_vs_cpu", "attention", "verify", "resume"}
    for part in ("shard", "full_width"):
        figures = summary[part]
        assert {"layers", "seq_length", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_mem_gb"} <= set(
            figures
        )
        assert figures["tokens_per_s"] > 0 and 0 < figures["mfu"] < 1
    assert summary["full_width"]["transformers_tokens_per_s"] > 0
    assert "block-diagonal" in summary["full_width"]["transformers_attention"]
    assert summary["matmul_bf16_tflops"] > 0 and summary["datasheet_peak_tflops"] == 989.0
    assert summary["shard"]["mfu_of_measured_matmul"] > summary["shard"]["mfu"]
    assert summary["checks"]["train_vs_cpu"]["figures"]["compared"] == "bf16 on cpu against fp32 on the CPU"
    shard = next(r for r in results if r["stage"] == "shard")["figures"]
    assert shard["budget"]["fits"] and shard["profile"]["split_s"]["gemm"] > 0
    # the dry run of the same shapes beside the measured peak (on a GPU: torch.cuda.max_memory_allocated)
    assert shard["dry_run"]["exit_status"] == 0 and summary["shard"]["dry_run_gib"] > 0


def test_the_budget_chooses_sizes_that_fit_the_device():
    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    from sizing import GPU, MARGIN, budget, largest_fitting_layers

    fitted = {}
    for usable in (78.0, 132.0):  # an H100 80GB's and an H200's free memory, GiB
        layers = largest_fitting_layers(GPU.shard, GPU.seq_length, "none", GPU.max_shard_layers, usable)
        assert budget(GPU.shard, layers, GPU.seq_length, "none", usable)["gib"] <= usable * (1 - MARGIN)
        assert not budget(GPU.shard, layers + 1, GPU.seq_length, "none", usable)["fits"]
        fitted[usable] = layers
    assert fitted[132.0] > fitted[78.0]
    # the logits of the recipe's full 152K vocabulary at 32K tokens alone are tens of GB (bf16 + fp32)
    full = budget(GPU.full_width, 2, 32768, "none", 78.0)
    assert full["parts_gb"]["logits"] > 25 and not full["fits"]


def test_the_packs_are_drawn_from_the_whole_packed_set_not_its_longest_first():
    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    from sizing import lognormal_packs, reasoning_pack_set

    def key(pack):
        return b"".join(tokens.tobytes() for tokens, _ in pack)

    every = reasoning_pack_set(4096, 1000, 16 * 8, seed=0)
    drawn = lognormal_packs(4096, 1000, 8, seed=0)
    assert len(every) > 3 * len(drawn) and {key(p) for p in drawn} <= {key(p) for p in every}
    conversations_per_pack = [len(p) for p in drawn]
    # best-fit decreasing's first packs hold the longest conversations, so fewer of them
    assert np.mean(conversations_per_pack) > np.mean([len(p) for p in every[:8]])


def _processes_in(work: Path) -> dict[int, str]:
    """pid -> command line of every live process whose environment names this run's BENCH_WORK."""
    marker = f"BENCH_WORK={work}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def _ranks(processes: dict[int, str]) -> set[int]:
    """The run_distributed ranks among them: processes forked from a fork server (same command line)."""
    parents = {}
    for pid in processes:
        try:
            parents[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except FileNotFoundError:
            continue
    return {pid for pid, parent in parents.items() if "forkserver" in processes[pid] and parent in processes}


@pytest.mark.slow
def test_a_stage_stopped_at_its_limit_records_why_and_leaves_no_process(tmp_path):
    """The shard stage trains in a rank (its own process group, which `timeout` does not signal) for far
    longer than the deadline allows; a rerun of it alone is merged with an earlier run's lines."""
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    earlier = [
        {"stage": "attention", "pass": True, "seconds": 2.0, "figures": {"kernel": "k", "tolerance": 0.02}},
        {"stage": "shard", "pass": False, "seconds": 9.0, "figures": {"error": "an earlier failure"}},
    ]
    (out / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in earlier))
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "BENCH_WORK": str(work),
        "STAGES": "shard",
        "BENCH_DEADLINE": "80",  # the limit: 80 s less the import check, summary (30) and kill (10)
        "BENCH_ITERS": "100000",
    }
    run = subprocess.Popen(
        [RUN_SH, str(out), "--device", "cpu", "--tiny"], env=env, stdout=subprocess.PIPE, text=True
    )
    ranks_seen: set[int] = set()
    while run.poll() is None:
        ranks_seen |= _ranks(_processes_in(work))
        time.sleep(0.5)
    assert run.returncode == 1, run.stdout.read()
    assert ranks_seen, "the stage's rank never started: no process for the limit to leave behind"
    deadline = time.monotonic() + 5
    while _processes_in(work) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_in(work), _processes_in(work)
    results = _results(out)
    assert [r["stage"] for r in results] == ["attention", "shard", "shard", "summary"]  # one line per stop
    stopped = results[2]
    assert not stopped["pass"] and stopped["figures"]["error"].startswith("StageStopped: timed out after ")
    summary = json.loads((out / "gpu_cpu.json").read_text())
    assert summary["stages"] == {
        "attention": {"pass": True, "seconds": 2.0},  # kept from the earlier run
        "shard": {"pass": False, "seconds": stopped["seconds"]},  # the newest line
    }
    assert summary["checks"]["attention"]["figures"] == earlier[0]["figures"]


@pytest.mark.slow
def test_the_deadline_skips_stages_it_cannot_fit_and_the_summary_still_runs(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "BENCH_WORK": str(tmp_path / "w")}
    unknown = subprocess.run(
        [RUN_SH, str(out)], env={**env, "STAGES": "env shards"}, capture_output=True, text=True
    )
    assert unknown.returncode == 2 and "STAGES names 'shards'" in unknown.stderr
    done = subprocess.run(
        [RUN_SH, str(out), "--device", "cpu", "--tiny"],
        env={**env, "STAGES": "env attention", "BENCH_DEADLINE": "45"},  # 45 - 40 kept: under a stage's 20
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    results = _results(out)
    assert [r["stage"] for r in results] == ["env", "attention", "summary"]
    for line in results[:2]:
        assert not line["pass"] and line["figures"]["error"].startswith("skipped: BENCH_DEADLINE=45 left")
    assert results[2]["pass"] is False and results[2]["figures"]["stages_passed"] == 0


def test_without_megatron_core_the_run_stops_at_once_naming_the_wheel_folder(tmp_path):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    started = time.monotonic()
    done = subprocess.run(
        [RUN_SH, str(tmp_path / "out")],
        env={**os.environ, "PYTHON": str(tmp_path / "bare" / "bin" / "python"), "BENCH_WORK": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3 and time.monotonic() - started < 20
    assert ".whl/" in done.stderr and "bench/gpu/fetch_wheels.sh" in done.stderr, done.stderr
    assert not (tmp_path / "out" / "results.jsonl").exists()
