"""One record batch of aligned rows -> token ids and loss masks, with LLaMA-Factory's semantics.

Per row, in order: the validity rule (`conversation.conversation_problem`: invalid rows are counted
by reason), the system text (a leading system turn, or the `system` column), the chat template's
pieces, the held-out decision (a seeded hash of the content). Then the batch's pieces are tokenised
in one call, and each conversation's pieces are joined and truncated to the cutoff per (source,
target) pair (`formats.chat_template.assemble`); with `overlong="drop"` a conversation past the
cutoff is counted and dropped instead.

`encode_batch` runs in worker processes (`preprocess.workers.ordered_map`): its settings are small
and travel with each task; the tokenizer is loaded once per process, from the path in the settings.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from formats.chat_template import ChatTemplate, assemble
from formats.packed import MASK_DTYPE, TOKEN_DTYPE
from formats.tokenizer import load_backend_tokenizer

from . import conversation


@dataclass(frozen=True)
class EncodeSettings:
    tokenizer: Path  # a local HF tokenizer directory
    template: ChatTemplate
    cutoff_len: int
    overlong: str  # "truncate" or "drop"
    system_source: str  # "turn" or "column"
    valid_fraction: float
    seed: int


@dataclass
class EncodedBatch:
    """The kept conversations of one record batch, concatenated, plus what happened to the others."""

    rows: int
    ids: np.ndarray  # every kept conversation's token ids, one after another
    mask: np.ndarray  # their loss masks (1 = trained)
    lengths: np.ndarray  # per kept conversation, after truncation
    full_lengths: np.ndarray  # the same conversations before truncation
    loss_tokens: np.ndarray
    held_out: np.ndarray  # bool: in the validation split
    subsets: list[str]
    dropped: Counter


@dataclass
class _Templated:
    """A valid conversation as the template's pieces (system slot, then one per turn)."""

    pieces: list[str]
    subset: str
    held_out: bool


def encode_batch(settings: EncodeSettings, batch: Any) -> EncodedBatch:
    """Encodes one pyarrow record batch of aligned rows (columns conversations [, system, subset])."""
    rows = batch.to_pylist()
    dropped: Counter = Counter()
    templated: list[_Templated] = []
    for row in rows:
        problem = conversation.conversation_problem(row.get("conversations"))
        if problem:
            dropped[problem] += 1
        else:
            templated.append(_apply_template(row, settings))
    piece_ids = _tokenise([piece for conv in templated for piece in conv.pieces], settings.tokenizer)
    return _assemble_batch(templated, piece_ids, settings, len(rows), dropped)


def _apply_template(row: dict[str, Any], settings: EncodeSettings) -> _Templated:
    turn_system, turns = conversation.split_system(row["conversations"])
    system = row.get("system") if settings.system_source == "column" else turn_system
    return _Templated(
        pieces=settings.template.pieces(system, [turn["value"] for turn in turns]),
        subset=row.get("subset") or "",
        held_out=conversation.held_out(row["conversations"], settings.valid_fraction, settings.seed),
    )


def _tokenise(pieces: list[str], tokenizer: Path) -> list[list[int]]:
    # Equal to transformers' tokenizer.encode(piece, add_special_tokens=False) for each piece.
    encodings = _backend_tokenizer(tokenizer).encode_batch_fast(pieces, add_special_tokens=False)
    return [encoding.ids for encoding in encodings]


@functools.cache
def _backend_tokenizer(path: Path):
    return load_backend_tokenizer(path)


def _assemble_batch(
    templated: list[_Templated],
    piece_ids: list[list[int]],
    settings: EncodeSettings,
    rows: int,
    dropped: Counter,
) -> EncodedBatch:
    ids: list[int] = []
    mask: list[int] = []
    kept: list[_Templated] = []
    lengths, full_lengths, loss_tokens = [], [], []
    start = 0
    for conv in templated:
        conv_ids, conv_mask, full = assemble(piece_ids[start : start + len(conv.pieces)], settings.cutoff_len)
        start += len(conv.pieces)
        if full > settings.cutoff_len and settings.overlong == "drop":
            dropped[conversation.OVERLONG] += 1
            continue
        ids += conv_ids
        mask += conv_mask
        kept.append(conv)
        lengths.append(len(conv_ids))
        full_lengths.append(full)
        loss_tokens.append(sum(conv_mask))
    return EncodedBatch(
        rows=rows,
        ids=np.asarray(ids, dtype=TOKEN_DTYPE),  # the spill holds the packed files' bytes
        mask=np.asarray(mask, dtype=MASK_DTYPE),
        lengths=np.asarray(lengths, dtype=np.int32),
        full_lengths=np.asarray(full_lengths, dtype=np.int64),
        loss_tokens=np.asarray(loss_tokens, dtype=np.int64),
        held_out=np.asarray([conv.held_out for conv in kept], dtype=bool),
        subsets=[conv.subset for conv in kept],
        dropped=dropped,
    )


def one_tokenizer_thread() -> None:
    """A worker process's initializer: one core per worker, through tokenizers' own thread pool with
    one thread, which is faster than its TOKENIZERS_PARALLELISM=false path (docs/benchmarks.md)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    os.environ["RAYON_NUM_THREADS"] = "1"
