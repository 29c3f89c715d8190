"""Metrics: wandb `online` without an API key falls back to offline with a warning (the logger starts
before any model is built) instead of failing or hanging; the JSONL file drops an interrupted attempt's
lines on resume."""

from __future__ import annotations

import json
import logging

from sft.config import load_config
from sft.metrics import MetricsLogger, wandb_mode


def test_online_needs_a_key(tmp_path):
    assert wandb_mode("online", {"HOME": str(tmp_path)})[0] == "offline"
    assert wandb_mode("online", {"HOME": str(tmp_path), "WANDB_API_KEY": "x" * 40}) == ("online", None)
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert wandb_mode("online", {"HOME": str(tmp_path)}) == ("online", None)
    assert wandb_mode("offline", {}) == ("offline", None) and wandb_mode("disabled", {}) == ("disabled", None)


def _metrics(iteration: int) -> dict:
    return {
        "loss": 1.0 / iteration,
        "lr": 1e-4,
        "grad_norm": 1.0,
        "loss_tokens": 10,
        "tokens_per_s": 1.0,
        "tflops_per_device": 1.0,
        "mfu": 0.1,
        "peak_memory_gb": 1.0,
        "step_time_s": 1.0,
        "skipped_steps": 0,
        "step_skipped": False,
    }


def test_wandb_online_without_a_key_runs_offline_and_the_file_resumes(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = load_config(None, [f"checkpoint.save_dir={tmp_path}", "logging.wandb_mode=online"])
    with caplog.at_level(logging.WARNING):
        logger = MetricsLogger(config, is_writer=True)
    assert "no WANDB_API_KEY" in caplog.text and "wandb runs offline" in caplog.text
    assert logger._wandb.settings.mode == "offline"
    logger.resume_at(0)
    for iteration in (1, 2, 3):
        logger.log(iteration, _metrics(iteration))
    logger.close()
    assert list((tmp_path / "wandb").glob("offline-run-*")), "the offline run is there to sync later"

    resumed = MetricsLogger(load_config(None, [f"checkpoint.save_dir={tmp_path}"]), is_writer=True)
    resumed.resume_at(2)  # the attempt that logged iteration 3 died before its checkpoint
    resumed.log(3, _metrics(3))
    resumed.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 2, 3]
