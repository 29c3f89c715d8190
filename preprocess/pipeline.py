"""Aligned conversations -> packed Megatron indexed datasets (token ids + loss masks) + metadata.

Stages, each with a progress bar:

1. tokenise: the aligned parquet is read in record batches; worker processes apply the chat template
   (`formats.chat_template`) and truncate or drop over-long conversations. Results come back in input
   order and are appended to two spill files (ids, masks); only per-conversation lengths stay in
   memory, so memory does not grow with the token count. Output is identical for any worker count.
2. pack: best-fit decreasing over all lengths (`preprocess.packing`), capacity `seq_length`.
3. write: packs are gathered from the spill files into the packed format (formats/packed.py):
   `PREFIX_input_ids.{bin,idx}` (int32) and `PREFIX_loss_mask.{bin,idx}` (uint8), one Megatron
   document = one pack, one sequence = one conversation. Everything is written under temporary names
   and renamed at the end; `PREFIX_meta.json` is written last, so its presence marks a complete output.

Entry point: tools/preprocess_sft.py.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import InputError
from common.files import atomic_output, file_fingerprint
from formats.chat_template import AM_THINKING, ChatTemplate, assemble
from formats.packed import PackedPaths, PackedWriter, padded_lengths
from formats.tokenizer import load_backend_tokenizer, tokenizer_fingerprint

from . import conversation as C
from .packing import PackPlan, best_fit_decreasing
from .stats import format_histogram, length_summary, log2_histogram, save_histogram_png

log = logging.getLogger(__name__)

ROWS_PER_TASK = 256
OVERLONG_CHOICES = ("truncate", "drop")
SYSTEM_SOURCES = ("turn", "column")


@dataclass
class PreprocessConfig:
    input: Path
    tokenizer: Path
    output_prefix: Path
    seq_length: int = 32768
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    overlong: str = "truncate"
    system_source: str = "turn"
    pad_multiple: int = 64
    seed: int = 1234
    force: bool = False

    @property
    def cutoff_len(self) -> int:
        """Per-conversation cutoff: LLaMA-Factory reserves one position of each packed row."""
        return self.seq_length - 1

    def validate(self) -> None:
        if not Path(self.input).is_file():
            raise InputError(f"--input {self.input} does not exist (make it with tools/get_am_dataset.py)")
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
        existing = [p for p in output_files(self.output_prefix) if p.exists()]
        if existing and not self.force:
            raise InputError(
                f"{existing[0]} exists; pass --force to overwrite the outputs of {self.output_prefix}"
            )


def histogram_path(prefix: Path | str) -> Path:
    return Path(f"{prefix}_lengths.png")


def output_files(prefix: Path | str) -> list[Path]:
    """Everything a run writes for `prefix`: the packed dataset and the length histogram."""
    return [*PackedPaths(str(prefix)).all_files(), histogram_path(prefix)]


# ----------------------------------------------------------------------------------------------------
# Stage 1: tokenisation (runs in worker processes)


@dataclass
class ChunkResult:
    """The encoded conversations of one record batch, plus what happened to the others."""

    rows: int
    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray  # kept conversations, after truncation
    full_lengths: np.ndarray  # the same conversations before truncation
    subsets: list[str]
    dropped: Counter


class ChunkEncoder:
    """Applies the template to a record batch of aligned rows."""

    def __init__(
        self, tokenizer_json: str, template: ChatTemplate, cutoff_len: int, overlong: str, system_source: str
    ):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(tokenizer_json)
        self.template = template
        self.cutoff_len = cutoff_len
        self.overlong = overlong
        self.system_source = system_source

    def encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        # Equal to transformers' tokenizer.encode(piece, add_special_tokens=False) for each piece.
        return [e.ids for e in self.backend.encode_batch_fast(pieces, add_special_tokens=False)]

    def __call__(self, batch) -> ChunkResult:
        rows = batch.to_pylist()
        dropped: Counter = Counter()
        valid: list[tuple[int, str]] = []  # (number of pieces, subset)
        pieces: list[str] = []
        for row in rows:
            problem = C.conversation_problem(row.get("conversations"))
            if problem:
                dropped[problem] += 1
                continue
            turn_system, turns = C.split_system(row["conversations"])
            system = row.get("system") if self.system_source == "column" else turn_system
            row_pieces = self.template.pieces(system, [t["value"] for t in turns])
            pieces += row_pieces
            valid.append((len(row_pieces), row.get("subset") or ""))

        encoded = self.encode_pieces(pieces)
        ids: list[int] = []
        mask: list[int] = []
        lengths, full_lengths, subsets = [], [], []
        start = 0
        for n_pieces, subset in valid:
            conv_ids, conv_mask, full = assemble(encoded[start : start + n_pieces], self.cutoff_len)
            start += n_pieces
            if full > self.cutoff_len and self.overlong == "drop":
                dropped[C.OVERLONG] += 1
                continue
            ids += conv_ids
            mask += conv_mask
            lengths.append(len(conv_ids))
            full_lengths.append(full)
            subsets.append(subset)
        return ChunkResult(
            rows=len(rows),
            ids=np.asarray(ids, dtype=np.int32),
            mask=np.asarray(mask, dtype=np.uint8),
            lengths=np.asarray(lengths, dtype=np.int32),
            full_lengths=np.asarray(full_lengths, dtype=np.int64),
            subsets=subsets,
            dropped=dropped,
        )


_worker_encoder: ChunkEncoder | None = None


def _init_worker(*args) -> None:
    global _worker_encoder
    # One core per worker. tokenizers' own thread pool with one thread is ~1.5x faster than its
    # TOKENIZERS_PARALLELISM=false path (measured: 630-720K vs 420-450K tokens/s per core).
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    os.environ["RAYON_NUM_THREADS"] = "1"
    _worker_encoder = ChunkEncoder(*args)


def _encode_in_worker(batch) -> ChunkResult:
    assert _worker_encoder is not None
    return _worker_encoder(batch)


def _ordered_parallel_map(encoder_args: tuple, batches: Iterable, workers: int) -> Iterator[ChunkResult]:
    """Encodes batches in worker processes, yielding results in input order with bounded memory.

    Results are consumed in submission order, so the output does not depend on the worker count;
    at most `4 * workers` batches are in flight (Pool.imap would read the whole input ahead).
    """
    import multiprocessing as mp

    window = 4 * workers
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=encoder_args) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@dataclass
class TokeniseResult:
    lengths: np.ndarray
    full_lengths: np.ndarray
    loss_tokens: int
    rows: int
    dropped: Counter
    per_subset: dict[str, dict[str, int]]


def tokenise_to_spill(
    cfg: PreprocessConfig, tokenizer_json: str, spill_ids: Path, spill_mask: Path
) -> TokeniseResult:
    import pyarrow.parquet as pq
    from tqdm import tqdm

    try:
        parquet = pq.ParquetFile(cfg.input)
    except Exception as exc:
        raise InputError(f"cannot read {cfg.input} as parquet: {exc}") from exc
    names = parquet.schema_arrow.names
    if "conversations" not in names:
        raise InputError(
            f"{cfg.input} has no `conversations` column (columns: {names}); align it with "
            "tools/get_am_dataset.py"
        )
    if cfg.system_source == "column" and "system" not in names:
        raise InputError(f"--system-source column needs a `system` column in {cfg.input}")
    columns = [c for c in ("conversations", "system", "subset") if c in names]
    batches = parquet.iter_batches(batch_size=ROWS_PER_TASK, columns=columns)
    encoder_args = (tokenizer_json, AM_THINKING, cfg.cutoff_len, cfg.overlong, cfg.system_source)

    lengths, full_lengths = [], []
    dropped: Counter = Counter()
    per_subset: dict[str, Counter] = {}
    rows = loss_tokens = 0
    with (
        open(spill_ids, "wb") as f_ids,
        open(spill_mask, "wb") as f_mask,
        tqdm(total=parquet.metadata.num_rows, unit="conv", desc="tokenise", unit_scale=True) as bar,
    ):
        for result in _ordered_parallel_map(encoder_args, batches, cfg.workers):
            result.ids.tofile(f_ids)
            result.mask.tofile(f_mask)
            lengths.append(result.lengths)
            full_lengths.append(result.full_lengths)
            loss_tokens += int(result.mask.sum(dtype=np.int64))
            dropped.update(result.dropped)
            rows += result.rows
            for subset, n in zip(result.subsets, result.lengths.tolist(), strict=True):
                counter = per_subset.setdefault(subset, Counter())
                counter["conversations"] += 1
                counter["tokens"] += n
            bar.update(result.rows)
    return TokeniseResult(
        lengths=np.concatenate(lengths) if lengths else np.zeros(0, np.int32),
        full_lengths=np.concatenate(full_lengths) if full_lengths else np.zeros(0, np.int64),
        loss_tokens=loss_tokens,
        rows=rows,
        dropped=dropped,
        per_subset={k: dict(v) for k, v in sorted(per_subset.items())},
    )


# ----------------------------------------------------------------------------------------------------
# Stage 3: writing packs


def write_packs(
    plan: PackPlan, lengths: np.ndarray, spill_ids: Path, spill_mask: Path, writer: PackedWriter
) -> None:
    from tqdm import tqdm

    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    ids_spill = np.memmap(spill_ids, dtype=np.int32, mode="r")
    mask_spill = np.memmap(spill_mask, dtype=np.uint8, mode="r")
    for p in tqdm(range(plan.num_packs), unit="pack", desc="write"):
        convs = plan.pack(p)
        ids = np.concatenate([ids_spill[starts[c] : starts[c + 1]] for c in convs])
        mask = np.concatenate([mask_spill[starts[c] : starts[c + 1]] for c in convs])
        writer.add(ids, mask, lengths[convs].tolist())


# ----------------------------------------------------------------------------------------------------
# The whole run


def preprocess(cfg: PreprocessConfig, command: list[str] | None = None) -> dict[str, Any]:
    """Runs the three stages and returns the metadata written to PREFIX_meta.json."""
    cfg.validate()
    timer = _StageTimer()
    backend = load_backend_tokenizer(cfg.tokenizer)
    Path(cfg.output_prefix).parent.mkdir(parents=True, exist_ok=True)
    spill_ids = Path(f"{cfg.output_prefix}_spill_ids.partial")
    spill_mask = Path(f"{cfg.output_prefix}_spill_mask.partial")
    try:
        timer.done("load tokenizer")
        tok = tokenise_to_spill(cfg, backend.to_str(), spill_ids, spill_mask)
        if len(tok.lengths) == 0:
            raise InputError(f"no conversation of {cfg.input} survived preprocessing: {dict(tok.dropped)}")
        timer.done("tokenise")
        padded = padded_lengths(tok.lengths, cfg.pad_multiple)
        plan = best_fit_decreasing(padded, cfg.seq_length, seed=cfg.seed).shuffled(cfg.seed)
        timer.done(f"pack {len(tok.lengths)} conversations")
        with PackedWriter(cfg.output_prefix, cfg.seq_length, cfg.pad_multiple) as writer:
            write_packs(plan, tok.lengths, spill_ids, spill_mask, writer)
            timer.done(f"write {plan.num_packs} packs")
            with atomic_output(histogram_path(cfg.output_prefix)) as png:
                title = f"{Path(cfg.output_prefix).name}: {len(tok.lengths)} conversations"
                save_histogram_png(tok.lengths, cfg.seq_length, png, title)
            meta = writer.commit(
                _metadata(cfg, tok, plan, backend.get_vocab_size(with_added_tokens=True), command)
            )
        timer.done("statistics and commit")
        log.info("stage times: %s", timer)
    finally:
        spill_ids.unlink(missing_ok=True)
        spill_mask.unlink(missing_ok=True)
    return meta


class _StageTimer:
    def __init__(self):
        import time

        self._clock = time.perf_counter
        self._last = self._clock()
        self.stages: list[tuple[str, float]] = []

    def done(self, stage: str) -> None:
        now = self._clock()
        self.stages.append((stage, now - self._last))
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.stages)


def _metadata(
    cfg: PreprocessConfig, tok: TokeniseResult, plan: PackPlan, vocab_size: int, command
) -> dict[str, Any]:
    total_tokens = int(tok.lengths.sum(dtype=np.int64))
    truncated = int((tok.full_lengths > tok.lengths).sum())
    dropped = {r: tok.dropped[r] for r in C.DROP_REASONS if tok.dropped[r]}
    pack_tokens = plan.pack_tokens(tok.lengths)
    padded_tokens = plan.pack_tokens(padded_lengths(tok.lengths, cfg.pad_multiple))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "force"}
    return {
        "template": AM_THINKING.name,
        "cutoff_len": cfg.cutoff_len,
        "settings": settings,
        "tokenizer": {
            "path": str(cfg.tokenizer),
            "sha256": tokenizer_fingerprint(cfg.tokenizer),
            "vocab_size": vocab_size,
            "stop_token": AM_THINKING.stop_token,
        },
        "inputs": [file_fingerprint(cfg.input)],
        "command": command,
        "stats": {
            "rows_read": tok.rows,
            "conversations": int(len(tok.lengths)),
            "dropped": dropped,
            "truncated": truncated,
            "tokens": total_tokens,
            "loss_tokens": tok.loss_tokens,
            "tokens_lost_to_truncation": int((tok.full_lengths - tok.lengths).sum()),
            "packs": plan.num_packs,
            "packing_efficiency": round(total_tokens / (plan.num_packs * cfg.seq_length), 6),
            "packing_efficiency_padded": round(
                int(padded_tokens.sum()) / (plan.num_packs * cfg.seq_length), 6
            ),
            "conversations_per_pack": round(len(tok.lengths) / plan.num_packs, 3),
            "max_pack_tokens": int(pack_tokens.max()),
            "max_pack_tokens_padded": int(padded_tokens.max()),
            "lengths": length_summary(tok.lengths),
            "length_histogram_log2": [list(row) for row in log2_histogram(tok.lengths, cfg.seq_length)],
            "per_subset": tok.per_subset,
        },
    }


def report(meta: dict[str, Any]) -> str:
    """A human-readable summary of PREFIX_meta.json."""
    s = meta["stats"]
    lines = [
        f"conversations   {s['conversations']:>12,} of {s['rows_read']:,} rows  (truncated "
        f"{s['truncated']:,}, "
        f"{s['tokens_lost_to_truncation']:,} tokens cut)",
        f"dropped         {sum(s['dropped'].values()):>12,}  {s['dropped'] or ''}",
        f"tokens          {s['tokens']:>12,}  (loss tokens {s['loss_tokens']:,}, "
        f"{s['loss_tokens'] / s['tokens']:.1%})",
        f"packs           {s['packs']:>12,}  x {meta['seq_length']} tokens, efficiency "
        f"{s['packing_efficiency']:.4%} ({s['packing_efficiency_padded']:.4%} with conversations padded to "
        f"multiples of {meta['pad_multiple']}), {s['conversations_per_pack']} conversations/pack",
        "length          "
        + "  ".join(f"{k}={v}" for k, v in s["lengths"]["percentiles"].items())
        + f"  max={s['lengths']['max']}",
    ]
    for subset, counts in s["per_subset"].items():
        lines.append(
            f"  subset {subset or '(none)':<14} {counts['conversations']:>10,} conversations "
            f"{counts['tokens']:>14,} tokens"
        )
    lines.append("tokens per conversation:\n" + format_histogram(s["length_histogram_log2"]))
    return "\n".join(lines)
