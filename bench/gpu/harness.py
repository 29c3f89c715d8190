"""What every GPU stage uses: the trainer run as a command, the tiny converted model the checks share,
the device's name and synchronisation."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from sft.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def pretrain(overrides: list[str], *, cpu_only: bool = False, timeout: float = 600) -> list[float]:
    """Runs pretrain_sft.py (one process) and returns its per-iteration losses from metrics.jsonl."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = (
            ""  # megatron-core's CPU redirection refuses to run where CUDA is visible
        )
    cmd = [sys.executable, str(ROOT / "pretrain_sft.py"), *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    sys.stderr.write(done.stderr[-6000:])
    if done.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} exited {done.returncode}")
    save_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("checkpoint.save_dir="))
    return [r["loss"] for r in read_metrics(Path(save_dir) / "metrics.jsonl")[0]]


def tiny_inputs(work: Path, seq_length: int = 256, family: str = "qwen2"):
    """A tiny model (a Qwen2 by default, or of `family` in models/registry.py; the real vocabulary)
    converted from HF, and random packs: made by the first stage that needs them, reused by the later
    ones (each stage is its own process)."""
    from testing.fixtures import TrainingInputs, training_inputs
    from testing.synthetic_packs import random_packs
    from testing.tiny_models import QWEN25_VOCAB_SIZE_SMALL, make_tiny_model

    root = work / ("tiny" if family == "qwen2" else f"tiny_{family}")
    if (root / "data" / "packs_meta.json").is_file():
        return TrainingInputs(root / "hf", root / "mcore", root / "data" / "packs", seq_length, packs=[])
    hf = None if family == "qwen2" else make_tiny_model(root / "hf", family)
    packs = random_packs(8, seq_length, QWEN25_VOCAB_SIZE_SMALL, seed=0)
    return training_inputs(root, packs, seq_length, hf=hf)


def relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
