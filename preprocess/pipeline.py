"""Aligned conversations -> packed Megatron indexed datasets (token ids + loss masks) + metadata.

`preprocess()` runs the stages in order, each its own module, each with a progress bar where it
takes time:

1. source (`preprocess.source`): the aligned parquet (tools/get_am_dataset.py's output), or the
   datasets a LLaMA-Factory registry names (`preprocess.registry`), one after another, read in batches;
2. convert + template + tokenise (`preprocess.encode`, in worker processes; `preprocess.spill`
   appends their results in input order to two spill files, keeping only per-conversation arrays in
   memory);
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
from formats.chat_template import ChatTemplate
from formats.packed import PackedWriter, validation_prefix
from formats.tokenizer import declared_special_token, load_backend_tokenizer

from . import conversation
from .config import PreprocessConfig, dataset_files, histogram_path
from .converters import AlignedConverter, converter_for
from .encode import Converter, EncodeSettings
from .meta import dataset_meta, provenance
from .packing import plan_packs
from .registry import dataset_entries
from .source import AlignedSource, RegistrySource
from .spill import EncodedConversations, SpillFiles, encode_to_spill
from .stats import save_histogram_png
from .write import write_packs

log = logging.getLogger(__name__)


def preprocess(cfg: PreprocessConfig, command: list[str] | None = None) -> dict[str, Any]:
    """Runs the stages and returns the metadata written to PREFIX_meta.json (the training set's)."""
    cfg.validate()
    timer = _StageTimer()
    template = cfg.chat_template
    bos_token, vocab_size = _check_tokenizer(cfg.tokenizer, template)
    source, converters, datasets = _open_source(cfg)
    Path(cfg.output_prefix).parent.mkdir(parents=True, exist_ok=True)
    timer.done("load tokenizer")
    made = provenance(cfg, template, vocab_size, source.inputs, datasets, command)
    timer.done("fingerprint inputs")

    settings = EncodeSettings(
        tokenizer=cfg.tokenizer,
        template=template,
        converters=converters,
        cutoff_len=cfg.cutoff_len,
        overlong=cfg.overlong,
        valid_fraction=cfg.valid_fraction,
        seed=cfg.seed,
        loss=cfg.loss,
        enable_thinking=cfg.enable_thinking,
        tool_date=cfg.tool_date or "",
        bos_token=bos_token,
    )
    spill = SpillFiles.beside(cfg.output_prefix)
    valid_prefix = validation_prefix(cfg.output_prefix)
    try:
        encoded = encode_to_spill(source, settings, spill, cfg.workers)
        timer.done("tokenise")
        check_every_dataset_kept(encoded, converters, datasets, cfg)
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


def _check_tokenizer(path: Path, template: ChatTemplate) -> tuple[str | None, int]:
    """Checks the tokenizer against the template before any worker starts (each loads its own);
    returns (the bos token the template opens with, if any; the vocabulary size)."""
    tokenizer = load_backend_tokenizer(path)
    if tokenizer.token_to_id(template.stop_token) is None:
        raise InputError(
            f"{path}: the tokenizer has no {template.stop_token} token, with which the "
            f"{template.name} chat template ends every assistant turn (as one token, the model's EOS): use "
            "a tokenizer that has it, or the template of its family (--template)"
        )
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    bos = declared_special_token(path, "bos_token") if template.bos_first else None
    if bos is not None and tokenizer.token_to_id(bos) is None:
        raise InputError(f"{path}: the tokenizer declares bos_token {bos!r} but has no such token")
    return bos, vocab_size  # no bos declared: LLaMA-Factory writes none either


def _open_source(cfg: PreprocessConfig):
    """(the rows' source, one converter per dataset, the datasets as the meta records them)."""
    if cfg.input is not None:
        source = AlignedSource.open(cfg.input, cfg.system_source == "column", cfg.max_samples)
        return (
            source,
            (AlignedConverter(cfg.system_source),),
            [{"name": Path(cfg.input).stem, "aligned": True}],
        )
    entries = dataset_entries(cfg.dataset_info, cfg.dataset_names)
    source = RegistrySource(tuple(entries), cfg.seed, max_samples=cfg.max_samples)
    return source, tuple(converter_for(entry) for entry in entries), [entry.record() for entry in entries]


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


def check_every_dataset_kept(
    encoded: EncodedConversations,
    converters: tuple[Converter, ...],
    datasets: list[dict[str, Any]],
    cfg: PreprocessConfig,
) -> None:
    """Raises InputError, before anything is written, when a dataset keeps no conversation (a mistake in
    its registry entry or its data, not a choice), naming it, its drops and what to change; warns when
    one keeps fewer than half of its rows."""
    kept = encoded.kept_per_dataset()
    lost = []
    for d, dataset in enumerate(datasets):
        rows, dropped = encoded.rows_per_dataset[d], encoded.dropped_per_dataset[d]
        counts = ", ".join(f"{r} {dropped[r]:,}" for r in conversation.DROP_REASONS if dropped[r])
        hints = "".join(f"; {hint}" for hint in converters[d].drop_hints(encoded.drop_details_per_dataset[d]))
        where = _dataset_label(dataset, cfg)
        if not rows:
            lost.append(f"{where} has no rows")
        elif not kept[d]:
            lost.append(
                f"{where}: none of its {rows:,} row{'s' * (rows != 1)} is kept (dropped: {counts}){hints}"
            )
        elif 2 * kept[d] < rows:
            log.warning(
                "%s: only %d of its %d rows are kept (dropped: %s)%s", where, kept[d], rows, counts, hints
            )
    if lost:
        raise InputError("nothing written: a dataset keeps no conversation\n  - " + "\n  - ".join(lost))


def _dataset_label(dataset: dict[str, Any], cfg: PreprocessConfig) -> str:
    """A dataset as the messages about its rows name it: its name and where its rows come from."""
    if dataset.get("aligned"):
        return str(cfg.input)
    if dataset.get("hub"):
        hub = dataset["hub"]
        return f"dataset {dataset['name']!r} (hub {hub['repo']}@{hub['revision'] or 'main'})"
    files = dataset["files"]
    more = f" and {len(files) - 1} more files" if len(files) > 1 else ""
    return f"dataset {dataset['name']!r} ({files[0]}{more})"


def split_held_out(encoded: EncodedConversations, cfg: PreprocessConfig) -> HeldOutSplit:
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
