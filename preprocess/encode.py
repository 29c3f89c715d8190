"""One batch of rows -> token ids and loss masks, with LLaMA-Factory's semantics.

Per row, in order: the dataset's converter (`preprocess.converters`: an `Example`, or the reason the
row is dropped, counted), the chat template's strings per message (`ChatTemplate.render`; tools or a
function call it cannot write drop the row under that reason), the held-out decision (a seeded hash
of the content). Then the batch's strings are tokenised in one call, each message's ids joined, and
each conversation's (source, target) pairs encoded and truncated to the cutoff
(`preprocess.sft_encoding`); with `overlong="drop"` a conversation past the cutoff is counted and
dropped instead.

`encode_batch` runs in worker processes (`preprocess.workers.ordered_map`): its settings are small
and travel with each task; the tokenizer is loaded once per process, from the path in the settings.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from formats.chat_template import ChatTemplate
from formats.packed import MASK_DTYPE, TOKEN_DTYPE
from formats.tokenizer import load_backend_tokenizer
from formats.tool_calls import NotExpressible

from . import conversation
from .converters import AlignedConverter, AlpacaConverter, Example, SharegptConverter
from .sft_encoding import LossOptions, encode_pairs
from .source import RowBatch

Converter = AlignedConverter | AlpacaConverter | SharegptConverter


@dataclass(frozen=True)
class EncodeSettings:
    tokenizer: Path  # a local HF tokenizer directory
    template: ChatTemplate
    converters: tuple[Converter, ...]  # per dataset of the run, in RowBatch.dataset order
    cutoff_len: int
    overlong: str  # "truncate" or "drop"
    valid_fraction: float
    seed: int
    loss: LossOptions = LossOptions()
    enable_thinking: bool = True
    tool_date: str = ""
    bos_token: str | None = None  # the tokenizer's, which templates with `bos_first` open with


@dataclass
class EncodedBatch:
    """The kept conversations of one batch (all of one dataset), concatenated, plus what happened to the
    others."""

    dataset: int
    rows: int
    ids: np.ndarray  # every kept conversation's token ids, one after another
    mask: np.ndarray  # their loss masks (1 = trained)
    lengths: np.ndarray  # per kept conversation, after truncation
    full_lengths: np.ndarray  # the same conversations before truncation
    loss_tokens: np.ndarray
    held_out: np.ndarray  # bool: in the validation split
    subsets: list[str]
    dropped: Counter
    drop_details: Counter  # (reason, what a dropped row holds) -> rows: the converters' drop_details


@dataclass
class _Templated:
    """A valid conversation as the template's strings, per message."""

    messages: list[list[str]]
    subset: str
    held_out: bool


def encode_batch(settings: EncodeSettings, batch: RowBatch) -> EncodedBatch:
    """Encodes one batch of rows of the dataset `batch.dataset`."""
    rows = batch.to_rows()
    convert = settings.converters[batch.dataset]
    dropped: Counter = Counter()
    details: Counter = Counter()
    templated: list[_Templated] = []
    for row in rows:
        example = convert(row) if isinstance(row, dict) else conversation.NOT_AN_OBJECT
        if isinstance(example, str):
            dropped[example] += 1
            if isinstance(row, dict):
                details.update((example, detail) for detail in convert.drop_details(row, example))
            continue
        try:
            templated.append(_apply_template(example, settings))
        except NotExpressible as exc:
            dropped[exc.reason] += 1
            details[exc.reason, str(exc).partition(": ")[0]] += 1  # without the parser's position
    pieces = [piece for conv in templated for message in conv.messages for piece in message]
    piece_ids = _tokenise(pieces, settings.tokenizer)
    return _assemble_batch(batch.dataset, templated, piece_ids, settings, len(rows), dropped, details)


def _apply_template(example: Example, settings: EncodeSettings) -> _Templated:
    messages = settings.template.render(
        example.system,
        example.tools,
        example.messages,
        bos_token=settings.bos_token,
        enable_thinking=settings.enable_thinking,
        tool_date=settings.tool_date,
    )
    return _Templated(
        messages=messages,
        subset=example.subset,
        held_out=conversation.held_out(example.key, settings.valid_fraction, settings.seed),
    )


def _tokenise(pieces: list[str], tokenizer: Path) -> list[list[int]]:
    # Equal to transformers' tokenizer.encode(piece, add_special_tokens=False) for each piece.
    encodings = _backend_tokenizer(tokenizer).encode_batch_fast(pieces, add_special_tokens=False)
    return [encoding.ids for encoding in encodings]


@functools.cache
def _backend_tokenizer(path: Path):
    return load_backend_tokenizer(path)


def _assemble_batch(
    dataset: int,
    templated: list[_Templated],
    piece_ids: list[list[int]],
    settings: EncodeSettings,
    rows: int,
    dropped: Counter,
    drop_details: Counter,
) -> EncodedBatch:
    ids: list[int] = []
    mask: list[int] = []
    kept: list[_Templated] = []
    lengths, full_lengths, loss_tokens = [], [], []
    pieces = iter(piece_ids)  # in the order of the conversations' messages' strings
    for conv in templated:
        message_ids = [_joined(pieces, len(message)) for message in conv.messages]
        pairs = list(zip(message_ids[::2], message_ids[1::2], strict=True))
        conv_ids, conv_mask, full = encode_pairs(pairs, settings.cutoff_len, settings.loss)
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
        dataset=dataset,
        rows=rows,
        ids=np.asarray(ids, dtype=TOKEN_DTYPE),  # the spill holds the packed files' bytes
        mask=np.asarray(mask, dtype=MASK_DTYPE),
        lengths=np.asarray(lengths, dtype=np.int32),
        full_lengths=np.asarray(full_lengths, dtype=np.int64),
        loss_tokens=np.asarray(loss_tokens, dtype=np.int64),
        held_out=np.asarray([conv.held_out for conv in kept], dtype=bool),
        subsets=[conv.subset for conv in kept],
        dropped=dropped,
        drop_details=drop_details,
    )


def _joined(pieces, count: int) -> list[int]:
    """The next `count` tokenised strings as one message's ids."""
    ids: list[int] = []
    for _ in range(count):
        ids += next(pieces)
    return ids


def one_tokenizer_thread() -> None:
    """A worker process's initializer: one core per worker, through tokenizers' own thread pool with
    one thread, which is faster than its TOKENIZERS_PARALLELISM=false path (docs/benchmarks.md)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    os.environ["RAYON_NUM_THREADS"] = "1"
