"""Per-iteration metrics to the console (one compact line), a JSONL file and Weights & Biases.

Only rank 0 writes. The JSONL file (default SAVE_DIR/metrics.jsonl) gets one object per logged
iteration; on resume, lines of iterations after the checkpoint (from the interrupted attempt) are
dropped, so the file reads as one uninterrupted run. wandb runs online, offline or disabled
(logging.wandb_mode); its API key is read by wandb from WANDB_API_KEY and never written anywhere.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from common.files import atomic_output

log = logging.getLogger(__name__)


def peak_memory_gb(device: str) -> float:
    """Peak GPU memory allocated by torch on CUDA; peak resident memory of this process on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30


def _truncate_after(path: Path, iteration: int) -> None:
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line)["iteration"] <= iteration
    ]
    with atomic_output(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


class MetricsLogger:
    def __init__(self, config, is_writer: bool, resume_iteration: int = 0):
        self.enabled = is_writer
        self._file = None
        self._wandb = None
        if not is_writer:
            return
        path = config.logging.metrics_file or str(Path(config.checkpoint.save_dir) / "metrics.jsonl")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _truncate_after(self.path, resume_iteration)
        self._file = self.path.open("a")
        if config.logging.wandb_mode != "disabled":
            self._wandb = self._start_wandb(config)

    @staticmethod
    def _start_wandb(config):
        import wandb

        run = wandb.init(
            mode=config.logging.wandb_mode,
            project=config.logging.wandb_project,
            name=config.logging.wandb_run_name,
            config=config.to_dict(),
            dir=config.checkpoint.save_dir,
        )
        log.info("wandb: %s run %s", config.logging.wandb_mode, run.name)
        return run

    def log(self, iteration: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"iteration": iteration, **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=iteration)
        log.info(
            "iter %d | loss %.4f | lr %.3g | grad norm %.3g | loss tokens %d | %.0f tok/s | %.3g TFLOP/s/dev "
            "(MFU %.1f%%) | mem %.2f GB | %.2f s%s",
            iteration,
            metrics["loss"],
            metrics["lr"],
            metrics["grad_norm"],
            metrics["loss_tokens"],
            metrics["tokens_per_s"],
            metrics["tflops_per_device"],
            100 * metrics["mfu"],
            metrics["peak_memory_gb"],
            metrics["step_time_s"],
            f" | SKIPPED (non-finite; {metrics['skipped_steps']} so far)" if metrics["step_skipped"] else "",
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
