"""The settings of one preprocessing run, validated before any work starts, and the files it writes.

`PreprocessConfig` is the one place its defaults live: tools/preprocess_sft.py builds its flags from
these fields, and the run records them in PREFIX_meta.json.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import InputError
from formats.chat_template import AM_THINKING, ChatTemplate, template_named
from formats.packed import PackedPaths, validation_prefix

from .sft_encoding import LossOptions

OVERLONG_CHOICES = ("truncate", "drop")
SYSTEM_SOURCES = ("turn", "column")


@dataclass
class PreprocessConfig:
    tokenizer: Path
    output_prefix: Path
    # Either the aligned AM-Thinking parquet, or a LLaMA-Factory registry and the datasets it names.
    input: Path | None = None
    dataset_info: Path | None = None
    dataset: str | None = None  # comma-separated names of --dataset-info's entries
    template: str = AM_THINKING.name
    mask_history: bool = False
    train_on_prompt: bool = False
    enable_thinking: bool = True
    # The date llama3's tool prompt names (LLaMA-Factory writes the day it runs); default: today.
    tool_date: str | None = None
    # Of each dataset, only the first rows (after num_samples), as LLaMA-Factory's max_samples.
    max_samples: int | None = None
    seq_length: int = 32768
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    overlong: str = "truncate"
    system_source: str = "turn"
    pad_multiple: int = 64
    valid_fraction: float = 0.0
    seed: int = 1234
    force: bool = False

    @property
    def cutoff_len(self) -> int:
        """Per-conversation cutoff: LLaMA-Factory reserves one position of each packed row."""
        return self.seq_length - 1

    @property
    def dataset_names(self) -> list[str]:
        return [name.strip() for name in (self.dataset or "").split(",") if name.strip()]

    @property
    def chat_template(self) -> ChatTemplate:
        return template_named(self.template, "--template")

    @property
    def loss(self) -> LossOptions:
        return LossOptions(train_on_prompt=self.train_on_prompt, mask_history=self.mask_history)

    def validate(self) -> None:
        if (self.input is None) == (self.dataset_info is None):
            raise InputError(
                "give either --input ALIGNED.parquet (tools/get_am_dataset.py) or --dataset-info REGISTRY "
                "with --dataset NAME[,NAME...]"
            )
        if self.input is not None and not Path(self.input).is_file():
            raise InputError(f"--input {self.input} does not exist (make it with tools/get_am_dataset.py)")
        if self.dataset_info is not None and not self.dataset_names:
            raise InputError("--dataset-info needs --dataset NAME[,NAME...]: the registry's entries to read")
        if self.dataset is not None and self.dataset_info is None:
            raise InputError("--dataset names entries of a registry: give it with --dataset-info")
        if self.dataset_info is not None and self.system_source != "turn":
            raise InputError("--system-source applies to --input; a registry entry names its `system` column")
        self.template = self.chat_template.name  # an unknown name raises, listing the templates
        self.loss.validate()
        if self.tool_date is None:
            self.tool_date = datetime.date.today().strftime("%d %b %Y")
        if self.seq_length < 16:
            raise InputError(f"--seq-length {self.seq_length} is too small (the recipe uses 32768)")
        if self.workers < 1:
            raise InputError(f"--workers must be >= 1, got {self.workers}")
        if self.overlong not in OVERLONG_CHOICES:
            raise InputError(f"--overlong must be one of {OVERLONG_CHOICES}, got {self.overlong!r}")
        if self.system_source not in SYSTEM_SOURCES:
            raise InputError(f"--system-source must be one of {SYSTEM_SOURCES}, got {self.system_source!r}")
        if self.pad_multiple < 1 or self.seq_length % self.pad_multiple:
            raise InputError(
                f"--pad-multiple {self.pad_multiple} must be >= 1 and divide --seq-length {self.seq_length}"
            )
        if self.max_samples is not None and self.max_samples < 1:
            raise InputError(f"--max-samples must be >= 1, got {self.max_samples}")
        if not 0 <= self.seed < 2**32:
            raise InputError(f"--seed must be in [0, 2**32), got {self.seed}")
        if not 0 <= self.valid_fraction < 1:
            raise InputError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")
        existing = [p for p in output_files(self.output_prefix) if p.exists()]
        if existing and not self.force:
            raise InputError(
                f"{existing[0]} exists; pass --force to overwrite the outputs of {self.output_prefix}"
            )


def histogram_path(prefix: Path | str) -> Path:
    return Path(f"{prefix}_lengths.png")


def dataset_files(prefix: Path | str) -> list[Path]:
    """A packed dataset and its length histogram."""
    return [*PackedPaths(str(prefix)).all_files(), histogram_path(prefix)]


def output_files(prefix: Path | str) -> list[Path]:
    """Everything a run may write for `prefix`: the training dataset and the held-out one."""
    return dataset_files(prefix) + dataset_files(validation_prefix(prefix))
