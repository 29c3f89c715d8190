"""The files that make the project's torch_dist checkpoints self-describing, and a training run's
directory of them: names and directory tests only, without torch, so that a job script, the requeue
logic or the configuration can find a run's checkpoints in a fraction of a second.

    complete_iterations("/runs/k2")      # {100: Path("/runs/k2/iter_0000100"), ...}

A checkpoint directory carries, beside megatron-core's files, `hf_config.json` (the model's Hugging
Face config, which the exporter needs), `tokenizer/`, `provenance.json` and, for a trained one,
`training_data.json`. A run directory holds one checkpoint per saved iteration in `iter_NNNNNNN/`; an
iteration is complete once its directory exists under that name (the trainer writes under a temporary
name and renames). Reading and writing the checkpoints themselves is `formats/torch_dist.py`.
"""

from __future__ import annotations

import re
from pathlib import Path

HF_CONFIG_FILE = "hf_config.json"
TOKENIZER_DIR = "tokenizer"
PROVENANCE_FILE = "provenance.json"
# What a training checkpoint's data was: {"chat_template": the name its datasets were encoded with}
TRAINING_DATA_FILE = "training_data.json"
_ITERATION_DIR = re.compile(r"^iter_(\d{7})$")


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def is_checkpoint(path: Path) -> bool:
    """Whether `path` holds a torch_dist checkpoint (DCP's `.metadata` and megatron-core's
    `metadata.json`); whether its data files are intact is `torch_dist.checkpoint_problems`."""
    return (path / ".metadata").is_file() and (path / "metadata.json").is_file()


def complete_iterations(run_dir: str | Path) -> dict[int, Path]:
    """The complete checkpoints of a training run directory, by iteration."""
    found = {}
    for child in Path(run_dir).iterdir():
        match = _ITERATION_DIR.match(child.name)
        if match and is_checkpoint(child):
            found[int(match.group(1))] = child
    return found
