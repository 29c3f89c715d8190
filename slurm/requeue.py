"""Whether a failed Slurm job should be requeued: slurm/sft.sh asks this after a non-zero exit.

A failed job (a rank's non-zero exit, a lost node, a hung collective ended by the watchdog) is
requeued to resume from its newest intact checkpoint, at most `max_requeues` times over the run
(counted in SAVE_DIR/failure_requeues.json across requeues), and never when it failed again without
progress: no newer intact checkpoint than at the previous failure (a run that cannot start, or that
crashes before its next save, would otherwise loop).

    python slurm/requeue.py SAVE_DIR --status 1 --max-requeues 3 [--cause TEXT] [--job ID]
    # prints the decision and why; exit status 0 = requeue, 1 = do not
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.files import write_json_atomic
from formats.run_files import complete_iterations
from formats.torch_dist import checkpoint_problems

RECORD_FILE = "failure_requeues.json"


@dataclass(frozen=True)
class Decision:
    requeue: bool
    reason: str


def newest_intact_iteration(save_dir: Path) -> int | None:
    """The iteration of the newest checkpoint that would load (None: none)."""
    if not save_dir.is_dir():
        return None
    iterations = complete_iterations(save_dir)
    return next((i for i in sorted(iterations, reverse=True) if not checkpoint_problems(iterations[i])), None)


def decide(save_dir: str | Path, status: int, max_requeues: int, cause: str = "", job: str = "") -> Decision:
    """Decides, and records the failure in SAVE_DIR/failure_requeues.json when the job is requeued."""
    save_dir = Path(save_dir)
    record_path = save_dir / RECORD_FILE
    failures = json.loads(record_path.read_text())["failures"] if record_path.is_file() else []
    progress = newest_intact_iteration(save_dir)
    where = f"newest intact checkpoint: {'iteration ' + str(progress) if progress is not None else 'none'}"
    if failures and failures[-1]["checkpoint_iteration"] == progress:
        return Decision(False, f"failed again without progress since the previous failure ({where})")
    requeued = sum(1 for f in failures if f["requeued"])
    if requeued >= max_requeues:
        return Decision(False, f"{requeued} failure requeues already (MAX_FAILURE_REQUEUES={max_requeues})")
    failures.append(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "job": job,
            "exit_status": status,
            "cause": cause,
            "checkpoint_iteration": progress,
            "requeued": True,
        }
    )
    save_dir.mkdir(parents=True, exist_ok=True)  # a run that failed at start-up has not made it yet
    write_json_atomic(record_path, {"failures": failures})
    return Decision(True, f"failure requeue {requeued + 1} of {max_requeues} ({where})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("save_dir", type=Path, help="the run's checkpoint.save_dir")
    parser.add_argument("--status", type=int, required=True, help="the failed job step's exit status")
    parser.add_argument(
        "--max-requeues", type=int, default=3, help="failure requeues allowed over the run (default 3)"
    )
    parser.add_argument("--cause", default="", help="what the job saw fail (recorded and printed)")
    parser.add_argument("--job", default="", help="the Slurm job id (recorded)")
    args = parser.parse_args(argv)
    decision = decide(args.save_dir, args.status, args.max_requeues, args.cause, args.job)
    verdict = "requeue" if decision.requeue else "do not requeue"
    print(f"exit status {args.status}{': ' + args.cause if args.cause else ''}; {verdict}: {decision.reason}")
    return 0 if decision.requeue else 1


if __name__ == "__main__":
    sys.exit(main())
