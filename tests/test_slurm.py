"""slurm/sft.sh under a real Slurm: the two-node cluster of slurm/ci_cluster.sh (started by .ci/run).

The job trains the tiny model with configs/tiny_cpu.yaml on 2 nodes x 2 gloo processes; USR1 to the
batch script makes the trainer checkpoint and stop, the script requeues the job, and the second run
resumes and finishes; a rank killed mid-run fails the job, which requeues itself and resumes; a job
that fails at start-up is requeued once and then stops. The losses must equal those of the same run
on one node without Slurm, uninterrupted.

Without a reachable cluster the test is skipped, unless K2_SLURM=required (as in CI), where it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm.requeue import newest_intact_iteration

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SEQ, PACKS, GLOBAL_BATCH = 128, 16, 4  # 2 epochs x 16 packs / 4 = 8 iterations


def _cluster_ready() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not found"
    try:
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    if states.returncode != 0 or states.stdout.split().count("idle") < 2:
        return f"no two idle Slurm nodes ({states.stdout.strip() or states.stderr.strip()})"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_ready()
    if problem:
        if os.environ.get("K2_SLURM") == "required":
            pytest.fail(f"K2_SLURM=required but {problem}: start it with slurm/ci_cluster.sh start")
        pytest.skip(f"{problem} (slurm/ci_cluster.sh start runs a local two-node cluster)")


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    from testing.fixtures import training_inputs
    from testing.synthetic_packs import random_packs
    from testing.tiny_models import QWEN25_VOCAB_SIZE_SMALL

    packs = random_packs(PACKS, SEQ, QWEN25_VOCAB_SIZE_SMALL, seed=0)
    return training_inputs(tmp_path_factory.mktemp("slurm"), packs, SEQ)


def _overrides(run_inputs, save_dir: Path) -> list[str]:
    return run_inputs.overrides(
        save_dir, f"schedule.global_batch_size={GLOBAL_BATCH}", "checkpoint.save_interval=100"
    )


def _losses(save_dir: Path) -> dict[int, float]:
    from sft.metrics import read_metrics

    records = read_metrics(save_dir / "metrics.jsonl")[0]
    assert len({r["iteration"] for r in records}) == len(records), "an iteration was logged twice"
    return {r["iteration"]: r["loss"] for r in records}


def _job_field(job: str, field: str) -> str:
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", text)
    return match.group(1) if match else ""


def _wait_for(condition, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _submit(run_inputs, tmp_path, save_dir: Path, overrides: list[str] | None = None) -> str:
    env = {
        **os.environ,
        "CONFIG": "configs/tiny_cpu.yaml",
        "GPUS_PER_NODE": "2",
        "LOG_DIR": str(tmp_path / "logs"),
        "REPO": str(ROOT),
        "VENV": str(Path(sys.executable).parents[1]),
        "OVERRIDES": " ".join(overrides or _overrides(run_inputs, save_dir)),
    }
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=2",
            "--gpus-per-node=0",
            "--time=30",
            f"--output={tmp_path}/job-%j.out",
            "slurm/sft.sh",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return submitted.stdout.strip().split(";")[0]


def _wait_for_the_end(job: str) -> str:
    """The final state of `job`, through its requeues."""

    held_since: float | None = None  # when the job was first seen held for its begin time

    def requeued_or_done():
        nonlocal held_since
        state = _job_field(job, "JobState")
        if state == "PENDING" and _job_field(job, "Reason") == "BeginTime":
            # Slurm delays a requeued job's start by a couple of minutes; not what is tested here. Not at
            # once, though: a start within the second of the requeue finds the previous run's credential
            # revoked (slurmctld: "Killing non-startable batch JobId=N: Job credential revoked").
            if held_since is None:
                held_since = time.monotonic()
            elif time.monotonic() - held_since > 5:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
        else:
            held_since = None  # the next requeue waits again
        return state if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None

    return _wait_for(requeued_or_done, 600, "the job to finish", poll=2.0)


def _run_job(
    run_inputs, tmp_path, save_dir: Path, overrides=None, after_iteration=None
) -> tuple[str, str, str]:
    """Submits slurm/sft.sh, calls `after_iteration` = (n, fn(job)) once n iterations are logged, waits
    for the job's end through its requeues; returns (job id, final state, the batch script's output)."""
    job = _submit(run_inputs, tmp_path, save_dir, overrides)
    try:
        if after_iteration:
            n, disturb = after_iteration
            metrics = save_dir / "metrics.jsonl"
            _wait_for(
                lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= n, 300, f"iteration {n}"
            )
            disturb(job)
        final_state = _wait_for_the_end(job)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    return job, final_state, (tmp_path / f"job-{job}.out").read_text()


def _job_output(job: str, tmp_path: Path) -> str:
    logs = "".join(p.read_text()[-3000:] for p in (tmp_path / "logs").rglob("*.log"))
    return (tmp_path / f"job-{job}.out").read_text() + logs


@pytest.fixture(scope="module")
def reference_losses(run_inputs, tmp_path_factory) -> dict[int, float]:
    """The same run on one node, uninterrupted, its 4 ranks forked from the test's own process."""
    from common.distributed import run_distributed

    from trainer_ranks import train_from_file

    reference = tmp_path_factory.mktemp("reference") / "run"
    run_distributed(
        train_from_file, 4, str(ROOT / "configs/tiny_cpu.yaml"), _overrides(run_inputs, reference)
    )
    return _losses(reference)


def _argv(pid: int | str) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return []


def _parent(pid: int | str) -> str:
    try:  # the field after the parenthesised command name, its state, is followed by the parent's pid
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        return ""


def _worker_pids(save_dir: Path) -> list[int]:
    """The trainer processes of the run at save_dir: torchrun's children, not torchrun or the srun shell,
    nor the processes a rank forks (megatron-core's background checkpoint writers share its command line)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        args = _argv(proc.name)
        if (
            "pretrain_sft.py" in args[:3]
            and not any("torchrun" in a or a == "-c" for a in args[:3])
            and f"checkpoint.save_dir={save_dir}" in args
            and any("torchrun" in a for a in _argv(_parent(proc.name))[:3])
        ):
            pids.append(int(proc.name))
    return sorted(pids)


def test_sbatch_trains_on_two_nodes_checkpoints_on_usr1_and_resumes(
    cluster, run_inputs, reference_losses, tmp_path
):
    save_dir, logs = tmp_path / "run", tmp_path / "logs"

    def usr1(job):  # to the batch script, as --signal=B:USR1@T does
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)

    job, final_state, output = _run_job(run_inputs, tmp_path, save_dir, after_iteration=(2, usr1))
    assert final_state == "COMPLETED", _job_output(job, tmp_path)
    assert _job_field(job, "Restarts") == "1"
    assert "requeueing job" in output and "training finished" in output

    stopped_at = min(int(p.name[5:]) for p in save_dir.glob("iter_*"))  # the USR1 checkpoint (interval 100)
    assert (
        2 <= stopped_at < 8
        and (save_dir / "iter_0000008").is_dir()
        and (save_dir / "finished.json").is_file()
    )
    ranks = {int(f.name.split("_")[2]) for f in (save_dir / "iter_0000008").glob("__*_*.distcp")}
    assert ranks == {0, 1, 2, 3}, ranks  # four processes wrote their optimizer shards (DP=4)
    node_logs = sorted((logs / job).glob("node*.log"))
    assert [p.name.split("-")[0] for p in node_logs] == ["node0", "node1"]
    # rank 0 (which logs at INFO) is on whichever node won the rendezvous, not necessarily node 0
    assert "resumed from" in "".join(p.read_text() for p in node_logs)

    got = _losses(save_dir)
    assert sorted(got) == list(range(1, 9)) and got.keys() == reference_losses.keys()
    assert all(got[i] == pytest.approx(reference_losses[i], rel=1e-6) for i in got), got


def test_a_killed_rank_fails_the_job_which_requeues_itself_and_resumes(
    cluster, run_inputs, reference_losses, tmp_path
):
    save_dir = tmp_path / "run"
    overrides = _overrides(run_inputs, save_dir)[:-1] + ["checkpoint.save_interval=2"]

    def kill_a_rank(job):  # as the kernel's OOM killer or a dying node would
        # once iteration 2's checkpoint is complete (it is saved in the background), so that there is one
        # to resume from
        _wait_for(lambda: (newest_intact_iteration(save_dir) or 0) >= 2, 60, "iteration 2's checkpoint")
        victim = _wait_for(lambda: _worker_pids(save_dir)[-1:], 60, "a trainer process")[0]
        os.kill(victim, signal.SIGKILL)

    job, final_state, output = _run_job(run_inputs, tmp_path, save_dir, overrides, (3, kill_a_rank))
    assert final_state == "COMPLETED", _job_output(job, tmp_path)
    assert _job_field(job, "Restarts") == "1"
    assert "training failed (exit status" in output and "requeue: failure requeue 1 of 3" in output
    (failure,) = json.loads((save_dir / "failure_requeues.json").read_text())["failures"]
    assert failure["job"] == job and failure["exit_status"] != 0 and failure["checkpoint_iteration"] >= 2
    got = _losses(save_dir)
    assert sorted(got) == list(range(1, 9))
    assert all(got[i] == pytest.approx(reference_losses[i], rel=1e-6) for i in got), got


def test_a_job_failing_at_start_up_stops_after_one_retry_without_progress(cluster, run_inputs, tmp_path):
    save_dir = tmp_path / "run"
    overrides = [o for o in _overrides(run_inputs, save_dir) if not o.startswith("data.prefixes=")]
    missing = [*overrides, f"data.prefixes=[{tmp_path / 'missing'}]"]
    job, final_state, output = _run_job(run_inputs, tmp_path, save_dir, missing)
    assert final_state == "FAILED", _job_output(job, tmp_path)
    assert _job_field(job, "Restarts") == "1"
    assert "requeue: failure requeue 1 of 3 (newest intact checkpoint: none)" in output
    assert "do not requeue: failed again without progress since the previous failure" in output
    assert "not requeued; fix the cause and resubmit" in output
