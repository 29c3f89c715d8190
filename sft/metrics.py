"""Per-iteration metrics to the console (one compact line), a JSONL file, TensorBoard and Weights & Biases.

Only rank 0 writes. The JSONL file (default SAVE_DIR/metrics.jsonl) gets one object per logged
iteration (key `loss`) and one per validation (key `val_loss`); on resume, lines of iterations after
the checkpoint (from the interrupted attempt) are dropped (`resume_at`), so the file reads as one
uninterrupted run. wandb runs online, offline or
disabled (logging.wandb_mode); its API key is read by wandb from WANDB_API_KEY and never written
anywhere. The logger starts before the model is built: wandb `online` without an API key, or without a
reachable server, falls back to `offline` with a warning (sync later with `wandb sync SAVE_DIR/wandb`)
instead of failing or hanging a job that has already paid for its start-up. TensorBoard event files
(logging.tensorboard, default SAVE_DIR/tensorboard) get the same scalars as wandb; a resumed run purges
the interrupted attempt's later events, as it does the JSONL lines.
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


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training records, validation records) of a metrics.jsonl file, each in file order."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def _start_tensorboard(directory: Path, iteration: int):
    """A SummaryWriter whose events after `iteration` (an interrupted attempt's) TensorBoard discards;
    None, with a warning, where the tensorboard package is missing (e.g. a slim cluster environment)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        log.warning("TensorBoard logging off: %s (pip install tensorboard)", exc)
        return None
    log.info("TensorBoard: tensorboard --logdir %s", directory)
    return SummaryWriter(str(directory), purge_step=iteration + 1 if iteration else None)


WANDB_INIT_TIMEOUT_S = 90


def wandb_mode(requested: str, environ) -> tuple[str, str | None]:
    """The wandb mode to use and, when it differs from the requested one, why: `online` needs an API key
    (WANDB_API_KEY, or a `wandb login` in ~/.netrc)."""
    if requested != "online" or environ.get("WANDB_API_KEY"):
        return requested, None
    netrc = Path(environ.get("NETRC") or Path(environ.get("HOME", "~")).expanduser() / ".netrc")
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace"):
        return requested, None
    return "offline", "logging.wandb_mode=online but no WANDB_API_KEY (nor a wandb login in ~/.netrc)"


class MetricsLogger:
    """Created before the model is built; `resume_at(iteration)` opens the JSONL file once the starting
    iteration is known, before the first `log`."""

    def __init__(self, config, is_writer: bool):
        self.enabled = is_writer
        self._file = None
        self._wandb = None
        self._tensorboard = None
        if not is_writer:
            return
        path = config.logging.metrics_file or str(Path(config.checkpoint.save_dir) / "metrics.jsonl")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tensorboard_dir = None
        if config.logging.tensorboard:
            default = Path(config.checkpoint.save_dir) / "tensorboard"
            self.tensorboard_dir = Path(config.logging.tensorboard_dir or default)
        if config.logging.wandb_mode != "disabled":
            self._wandb = self._start_wandb(config)

    def resume_at(self, iteration: int) -> None:
        """Opens the JSONL file for appending, without the lines of iterations after `iteration` (those of
        an interrupted attempt)."""
        if not self.enabled:
            return
        if self.path.exists():
            _truncate_after(self.path, iteration)
        self._file = self.path.open("a")
        if self.tensorboard_dir is not None:
            self._tensorboard = _start_tensorboard(self.tensorboard_dir, iteration)

    @staticmethod
    def _start_wandb(config):
        import os

        import wandb

        mode, why = wandb_mode(config.logging.wandb_mode, os.environ)
        if why:
            log.warning("%s: wandb runs offline (sync later with `wandb sync`)", why)
        kwargs = dict(
            project=config.logging.wandb_project,
            name=config.logging.wandb_run_name,
            config=config.to_dict(),
            dir=config.checkpoint.save_dir,
        )
        try:
            run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S), **kwargs)
        except Exception as exc:  # an unreachable server or a refused key: keep training, log offline
            if mode != "online":
                raise
            log.warning("wandb online failed (%s): wandb runs offline (sync later with `wandb sync`)", exc)
            run = wandb.init(mode="offline", **kwargs)
        log.info("wandb: %s run %s", run.settings.mode, run.name)
        return run

    def log(self, iteration: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"iteration": iteration, **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._to_remote_loggers(iteration, metrics)
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

    def log_validation(self, iteration: int, metrics: dict[str, Any]) -> None:
        """A validation result (val_loss, val_loss_tokens, ...): its own JSONL line, the same wandb step."""
        if not self.enabled:
            return
        self._file.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
        self._file.flush()
        self._to_remote_loggers(iteration, metrics)
        log.info(
            "iter %d | validation loss %.4f over %d loss tokens of %d held-out packs | %.2f s",
            iteration,
            metrics["val_loss"],
            metrics["val_loss_tokens"],
            metrics["val_packs"],
            metrics["val_time_s"],
        )

    def _to_remote_loggers(self, iteration: int, metrics: dict[str, Any]) -> None:
        if self._wandb is not None:
            self._wandb.log(metrics, step=iteration)
        if self._tensorboard is not None:
            for name, value in metrics.items():
                self._tensorboard.add_scalar(name, float(value), iteration)
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
