"""Aligned conversations -> packed Megatron indexed datasets (token ids + loss masks) + metadata.

`preprocess()` runs the stages in order, each its own module, each with a progress bar where it
takes time:

1. source (`preprocess.source`): the aligned parquet (tools/get_am_dataset.py's output), its columns
   checked, read in record batches;
2. template + tokenise (`preprocess.encode`, in worker processes; `preprocess.spill` appends their
   results in input order to two spill files, keeping only per-conversation arrays in memory);
3. split: the held-out conversations (`conversation.held_out`: a seeded hash of each conversation's
   content) become their own dataset `PREFIX_valid`, written before the training dataset;
4. pack (`preprocess.packing.plan_packs`): best-fit decreasing over all of a dataset's lengths;
5. write (`preprocess.write`): packs gathered from the spill files into the packed format
   (formats/packed.py): `PREFIX_input_ids.{bin,idx}` (int32) and `PREFIX_loss_mask.{bin,idx}`
   (uint8), one Megatron document = one pack, one sequence = one conversation;
6. meta (`preprocess.meta`): `PREFIX_meta.json`, committed last, so its presence marks a complete
   output (everything is written under temporary names and renamed at the commit).

Entry point: tools/preprocess_sft.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import InputError
from common.files import atomic_output
from formats.chat_template import AM_THINKING
from formats.packed import PackedWriter, validation_prefix
from formats.tokenizer import load_backend_tokenizer

from .config import PreprocessConfig, dataset_files, histogram_path
from .encode import EncodeSettings
from .meta import dataset_meta, provenance
from .packing import plan_packs
from .source import AlignedSource
from .spill import EncodedConversations, SpillFiles, encode_to_spill
from .stats import save_histogram_png
from .write import write_packs

log = logging.getLogger(__name__)


def preprocess(cfg: PreprocessConfig, command: list[str] | None = None) -> dict[str, Any]:
    """Runs the stages and returns the metadata written to PREFIX_meta.json (the training set's)."""
    cfg.validate()
    timer = _StageTimer()
    template = AM_THINKING
    # Loaded here once to check the files before any worker starts (each worker loads its own).
    tokenizer = load_backend_tokenizer(cfg.tokenizer)
    if tokenizer.token_to_id(template.stop_token) is None:
        raise InputError(
            f"{cfg.tokenizer}: the tokenizer has no {template.stop_token} token, with which the "
            f"{template.name} chat template ends every assistant turn (as one token, the model's EOS): use "
            "a tokenizer that has it"
        )
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    source = AlignedSource.open(cfg.input, need_system_column=cfg.system_source == "column")
    Path(cfg.output_prefix).parent.mkdir(parents=True, exist_ok=True)
    timer.done("load tokenizer")
    made = provenance(cfg, template, vocab_size, command)
    timer.done("fingerprint inputs")

    settings = EncodeSettings(
        cfg.tokenizer, template, cfg.cutoff_len, cfg.overlong, cfg.system_source, cfg.valid_fraction, cfg.seed
    )
    spill = SpillFiles.beside(cfg.output_prefix)
    valid_prefix = validation_prefix(cfg.output_prefix)
    try:
        encoded = encode_to_spill(source, settings, spill, cfg.workers)
        timer.done("tokenise")
        split = split_held_out(encoded, cfg)
        for stale in dataset_files(valid_prefix):  # from an earlier run (replacing it needs --force)
            stale.unlink(missing_ok=True)
        meta: dict[str, Any] = {}
        for role, prefix, members in (
            ("valid", valid_prefix, split.valid),
            ("train", cfg.output_prefix, split.train),
        ):
            if len(members):
                record = split.record(role, Path(valid_prefix).name)
                meta = _pack_and_write(prefix, members, record, encoded, spill, made, cfg, timer)
        log.info("stage times: %s", timer)
    except BaseException:
        for partial_output in dataset_files(valid_prefix):  # never a held-out set without its training set
            partial_output.unlink(missing_ok=True)
        raise
    finally:
        spill.remove()
    return meta


@dataclass(frozen=True)
class HeldOutSplit:
    """The conversations (indices in spill order) of the training and the held-out dataset."""

    train: np.ndarray
    valid: np.ndarray
    valid_fraction: float
    seed: int

    def record(self, role: str, valid_prefix: str) -> dict[str, Any]:
        """The split as each dataset's meta records it (the training set's names its held-out set)."""
        record = {
            "valid_fraction": self.valid_fraction,
            "seed": self.seed,
            "train_conversations": len(self.train),
            "valid_conversations": len(self.valid),
        }
        if role == "train" and len(self.valid):
            record["valid_prefix"] = valid_prefix
        return {**record, "role": role}


def split_held_out(encoded: EncodedConversations, cfg: PreprocessConfig) -> HeldOutSplit:
    if len(encoded.lengths) == 0:
        raise InputError(f"no conversation of {cfg.input} survived preprocessing: {dict(encoded.dropped)}")
    split = HeldOutSplit(
        np.flatnonzero(~encoded.held_out), np.flatnonzero(encoded.held_out), cfg.valid_fraction, cfg.seed
    )
    if len(split.train) == 0:
        raise InputError(
            f"--valid-fraction {cfg.valid_fraction} held out all {len(split.valid)} conversations: lower it"
        )
    if cfg.valid_fraction > 0 and len(split.valid) == 0:
        log.warning(
            "--valid-fraction %s held out none of %d conversations", cfg.valid_fraction, len(split.train)
        )
    return split


def _pack_and_write(
    prefix: str | Path,
    members: np.ndarray,
    split: dict[str, Any],
    encoded: EncodedConversations,
    spill: SpillFiles,
    made: dict[str, Any],
    cfg: PreprocessConfig,
    timer: _StageTimer,
) -> dict[str, Any]:
    """Packs, writes and commits the conversations `members` as the dataset `prefix`."""
    role = split["role"]
    lengths = encoded.lengths[members]
    plan = plan_packs(lengths, cfg.seq_length, cfg.pad_multiple, cfg.seed)
    timer.done(f"pack {len(members)} {role} conversations")
    with PackedWriter(prefix, cfg.seq_length, cfg.pad_multiple) as writer:
        write_packs(plan, members, encoded.lengths, *spill, writer, cfg.workers, desc=f"write {role}")
        timer.done(f"write {plan.num_packs} {role} packs")
        with atomic_output(histogram_path(prefix)) as png:
            save_histogram_png(
                lengths, cfg.seq_length, png, f"{Path(prefix).name}: {len(members)} conversations"
            )
        meta = writer.commit(dataset_meta(made, encoded, members, plan, cfg, split))
    timer.done(f"{role} statistics and commit")
    return meta


class _StageTimer:
    def __init__(self):
        self._last = time.perf_counter()
        self.stages: list[tuple[str, float]] = []

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages.append((stage, now - self._last))
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.stages)
