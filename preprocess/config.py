"""The settings of one preprocessing run, validated before any work starts, and the files it writes.

`PreprocessConfig` is the one place its settings are defined and documented: each field's comment is
its flag's help (tools/preprocess_sft.py builds the flags from the fields, as the trainer's `--help`
lists its configuration keys from theirs: common/config_docs.py), and the run records them in
PREFIX_meta.json.
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
    # local Hugging Face tokenizer directory (the base model's, e.g. Qwen2.5-32B)
    tokenizer: Path
    # path prefix P of the outputs P_input_ids.*, P_loss_mask.*, P_meta.json
    output_prefix: Path
    # aligned parquet from tools/get_am_dataset.py (columns conversations, system, subset); or give
    # --dataset-info and --dataset instead
    input: Path | None = None
    # a LLaMA-Factory dataset registry: dataset_info.json, or the folder holding it (file_name paths are
    # relative to its folder)
    dataset_info: Path | None = None
    # NAME[,NAME...]: the registry's datasets to read, concatenated in this order and packed together
    # (counts per dataset go in PREFIX_meta.json)
    dataset: str | None = None
    # chat template, by LLaMA-Factory's name (the recipe's is the default; am-thinking also works); its
    # stop token must be in the tokenizer
    template: str = AM_THINKING.name
    # train on the last assistant turn only (LLaMA-Factory's mask_history; truncation then keeps the
    # last turns); default: every assistant turn, as the recipe
    mask_history: bool = False
    # train on the prompts too (LLaMA-Factory's train_on_prompt); not with --mask-history
    train_on_prompt: bool = False
    # reasoning templates (qwen3): with it (LLaMA-Factory's default), an answer without a <think> block
    # gets an empty one, trained; without it, every answer's thoughts are removed and the empty block
    # goes untrained into the prompt
    enable_thinking: bool = True
    # the date the llama3 template's tool prompt names, e.g. '26 Jul 2024' (LLaMA-Factory writes the
    # day it runs; default: today); recorded in PREFIX_meta.json
    tool_date: str | None = None
    # of each dataset, only the first N rows (after a registry entry's num_samples draw), as
    # LLaMA-Factory's max_samples: for quick runs; default all
    max_samples: int | None = None
    # tokens per packed sequence (the recipe's 32768); each conversation is cut to seq_length - 1
    # tokens, as LLaMA-Factory does when packing
    seq_length: int = 32768
    # tokeniser processes (default: all cores); the output is identical for any value
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    # conversations longer than the cutoff: truncate them with the recipe's per-turn rule, or drop
    # them; either way they are counted
    overlong: str = "truncate"
    # --input only: where a sample's system text comes from: 'turn' (the recipe) = a leading turn with
    # from == 'system', else the template's default prompt; 'column' = the aligned `system` column,
    # else the default prompt (a deviation from the recipe)
    system_source: str = "turn"
    # pack conversations as if each were rounded up to a multiple of N tokens, so that every pack still
    # fits --seq-length when the trainer pads each conversation for context parallelism (to 2 x CP, x TP
    # with sequence parallelism; 64 serves every layout up to that); recorded in PREFIX_meta.json; 1
    # packs the real lengths, as LLaMA-Factory does
    pad_multiple: int = 64
    # hold out about this fraction of the conversations (0: none) as a validation set, written as the
    # dataset PREFIX_valid (the trainer evaluates on it); a conversation's side is decided by a seeded
    # hash of its content, so it stays held out when the dataset grows or is reordered
    valid_fraction: float = 0.0
    # seed for tie-breaking among equal lengths, the order of packs, the held-out split and the
    # registry's num_samples draws (LLaMA-Factory's training seed gives its draws)
    seed: int = 1234
    # overwrite existing outputs of this prefix
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
