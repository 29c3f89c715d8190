"""slurm/requeue.py, the failure-requeue policy of slurm/sft.sh: bounded, and never without progress
(the real Slurm job is in tests/test_slurm.py)."""

from __future__ import annotations

import json

import torch

from formats.run_files import iteration_dir_name
from formats.torch_dist import Chunk, write_checkpoint
from slurm.requeue import RECORD_FILE, decide, main


def _checkpoint(save_dir, iteration):
    value = torch.full((4,), float(iteration))
    chunk = Chunk("w", (4,), (0,), (4,), torch.float32, lambda: value)
    write_checkpoint(save_dir / iteration_dir_name(iteration), [chunk])


def test_requeues_are_bounded_and_need_progress(tmp_path):
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    # Fails at start-up: requeued once; fails again with still no checkpoint: not requeued.
    first = decide(save_dir, 1, max_requeues=2, cause="error: boom", job="7")
    assert first.requeue and first.reason == "failure requeue 1 of 2 (newest intact checkpoint: none)"
    again = decide(save_dir, 1, max_requeues=2)
    assert not again.requeue and "without progress since the previous failure" in again.reason
    # Progress (a checkpoint at 2) since: requeued; a damaged newer one (4) is not progress.
    _checkpoint(save_dir, 2)
    assert (
        decide(save_dir, 1, max_requeues=2).reason
        == "failure requeue 2 of 2 (newest intact checkpoint: iteration 2)"
    )
    _checkpoint(save_dir, 4)
    next((save_dir / iteration_dir_name(4)).glob("*.distcp")).unlink()
    assert "without progress" in decide(save_dir, 1, max_requeues=2).reason
    # Real progress, but the budget is spent.
    _checkpoint(save_dir, 6)
    spent = decide(save_dir, 1, max_requeues=2)
    assert not spent.requeue and spent.reason == "2 failure requeues already (MAX_FAILURE_REQUEUES=2)"
    record = json.loads((save_dir / RECORD_FILE).read_text())["failures"]
    assert [(f["job"], f["cause"], f["checkpoint_iteration"]) for f in record] == [
        ("7", "error: boom", None),
        ("", "", 2),
    ]


def test_command_line_exit_status_is_the_decision(tmp_path, capsys):
    save_dir = tmp_path / "not-yet-made"  # a run that failed before the trainer made its directory
    assert main([str(save_dir), "--status", "3", "--cause", "rank 0: hung"]) == 0
    assert capsys.readouterr().out.startswith("exit status 3: rank 0: hung; requeue: failure requeue 1 of 3")
    assert main([str(save_dir), "--status", "3"]) == 1
    assert "do not requeue: failed again without progress" in capsys.readouterr().out
