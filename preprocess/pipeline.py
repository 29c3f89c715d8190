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

With `valid_fraction` > 0 a held-out split (`preprocess.conversation.held_out`: a seeded hash of each
conversation's content) is packed and written the same way as its own dataset `PREFIX_valid`, before
the training dataset; the training meta records the split.

Entry point: tools/preprocess_sft.py.
"""

from __future__ import annotations

import functools
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
from formats.packed import (
    MASK_DTYPE,
    TOKEN_DTYPE,
    PackedPaths,
    PackedWriter,
    RegionWriter,
    padded_lengths,
    validation_prefix,
)
from formats.tokenizer import load_backend_tokenizer, tokenizer_fingerprint

from . import conversation
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
    valid_fraction: float = 0.0
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
    loss_tokens: np.ndarray  # per kept conversation
    held_out: np.ndarray  # bool per kept conversation: in the validation split
    subsets: list[str]
    dropped: Counter


class ChunkEncoder:
    """Applies the template to a record batch of aligned rows."""

    def __init__(
        self,
        tokenizer_json: str,
        template: ChatTemplate,
        cutoff_len: int,
        overlong: str,
        system_source: str,
        valid_fraction: float = 0.0,
        seed: int = 0,
    ):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(tokenizer_json)
        self.template = template
        self.cutoff_len = cutoff_len
        self.overlong = overlong
        self.system_source = system_source
        self.valid_fraction, self.seed = valid_fraction, seed

    def encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        # Equal to transformers' tokenizer.encode(piece, add_special_tokens=False) for each piece.
        return [e.ids for e in self.backend.encode_batch_fast(pieces, add_special_tokens=False)]

    def __call__(self, batch) -> ChunkResult:
        rows = batch.to_pylist()
        dropped: Counter = Counter()
        valid: list[tuple[int, str, bool]] = []  # (number of pieces, subset, held out)
        pieces: list[str] = []
        for row in rows:
            problem = conversation.conversation_problem(row.get("conversations"))
            if problem:
                dropped[problem] += 1
                continue
            turn_system, turns = conversation.split_system(row["conversations"])
            system = row.get("system") if self.system_source == "column" else turn_system
            row_pieces = self.template.pieces(system, [t["value"] for t in turns])
            pieces += row_pieces
            held = conversation.held_out(row["conversations"], self.valid_fraction, self.seed)
            valid.append((len(row_pieces), row.get("subset") or "", held))

        encoded = self.encode_pieces(pieces)
        ids: list[int] = []
        mask: list[int] = []
        lengths, full_lengths, loss_tokens, held_out, subsets = [], [], [], [], []
        start = 0
        for n_pieces, subset, held in valid:
            conv_ids, conv_mask, full = assemble(encoded[start : start + n_pieces], self.cutoff_len)
            start += n_pieces
            if full > self.cutoff_len and self.overlong == "drop":
                dropped[conversation.OVERLONG] += 1
                continue
            ids += conv_ids
            mask += conv_mask
            lengths.append(len(conv_ids))
            full_lengths.append(full)
            loss_tokens.append(sum(conv_mask))
            held_out.append(held)
            subsets.append(subset)
        return ChunkResult(
            rows=len(rows),
            ids=np.asarray(ids, dtype=TOKEN_DTYPE),  # the spill holds the packed files' bytes
            mask=np.asarray(mask, dtype=MASK_DTYPE),
            lengths=np.asarray(lengths, dtype=np.int32),
            full_lengths=np.asarray(full_lengths, dtype=np.int64),
            loss_tokens=np.asarray(loss_tokens, dtype=np.int64),
            held_out=np.asarray(held_out, dtype=bool),
            subsets=subsets,
            dropped=dropped,
        )


_worker_encoder: ChunkEncoder | None = None


def _init_worker(*args) -> None:
    global _worker_encoder
    # One core per worker, through tokenizers' own thread pool with one thread: faster than its
    # TOKENIZERS_PARALLELISM=false path (figures in docs/benchmarks.md, preprocessing).
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
    """Per kept conversation, in input (= spill) order: lengths, loss tokens, split; plus the counts."""

    lengths: np.ndarray
    full_lengths: np.ndarray
    loss_tokens: np.ndarray
    held_out: np.ndarray
    rows: int
    dropped: Counter
    per_subset: dict[str, dict[str, dict[str, int]]]  # split ("train"/"valid") -> subset -> counts


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
    encoder_args = (
        tokenizer_json,
        AM_THINKING,
        cfg.cutoff_len,
        cfg.overlong,
        cfg.system_source,
        cfg.valid_fraction,
        cfg.seed,
    )

    lengths, full_lengths, loss_tokens, held_out = [], [], [], []
    dropped: Counter = Counter()
    per_subset: dict[tuple[str, str], Counter] = {}
    rows = 0
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
            loss_tokens.append(result.loss_tokens)
            held_out.append(result.held_out)
            dropped.update(result.dropped)
            rows += result.rows
            for subset, n, held in zip(
                result.subsets, result.lengths.tolist(), result.held_out.tolist(), strict=True
            ):
                counter = per_subset.setdefault(("valid" if held else "train", subset), Counter())
                counter["conversations"] += 1
                counter["tokens"] += n
            bar.update(result.rows)
    splits: dict[str, dict[str, dict[str, int]]] = {"train": {}, "valid": {}}
    for (split, subset), counter in sorted(per_subset.items()):
        splits[split][subset] = dict(counter)
    joined = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    return TokeniseResult(
        lengths=joined(lengths, np.int32),
        full_lengths=joined(full_lengths, np.int64),
        loss_tokens=joined(loss_tokens, np.int64),
        held_out=joined(held_out, bool),
        rows=rows,
        dropped=dropped,
        per_subset=splits,
    )


# ----------------------------------------------------------------------------------------------------
# Stage 3: writing packs


def write_packs(
    plan: PackPlan,
    members: np.ndarray,
    lengths: np.ndarray,
    spill_ids: Path,
    spill_mask: Path,
    writer: PackedWriter,
    workers: int = 1,
    desc: str = "write",
    gather_tokens: int = 1 << 19,
) -> None:
    """Writes the packs of `plan`, whose conversation numbers index `members` (this dataset's
    conversations among all in the spill files, whose lengths are `lengths`).

    Every pack's place in the output is reserved first; then `workers` processes each copy the
    conversations of a contiguous run of packs from the spill files to their places, through a reused
    buffer of `gather_tokens` tokens (large writes from a buffer small enough to stay in the CPU's
    cache between the gather and the write), so the files are the same for any worker count."""
    from tqdm import tqdm

    global _fill
    conversations = members[plan.order]  # pack by pack, as numbers in the spill files
    starts = writer.reserve(lengths[conversations], plan.offsets)
    ends = np.cumsum(lengths, dtype=np.int64)
    _fill = _PackFiller(
        spill_ids,
        spill_mask,
        ends - lengths,
        lengths,
        conversations,
        plan.offsets,
        starts,
        writer.region_writer(),
        gather_tokens,
    )
    tasks = _contiguous_runs(plan.pack_tokens(lengths[members]).tolist(), parts=8 * workers)
    try:
        with tqdm(total=plan.num_packs, unit="pack", desc=desc) as bar:
            if workers == 1 or len(tasks) == 1:
                for task in tasks:
                    bar.update(_run_fill(task))
            else:
                import multiprocessing as mp

                # fork: the workers inherit the plan's arrays instead of receiving them pickled
                with mp.get_context("fork").Pool(workers) as pool:
                    for done in pool.imap_unordered(_run_fill, tasks):
                        bar.update(done)
    finally:
        _fill = None


@dataclass
class _PackFiller:
    spill_ids: Path
    spill_mask: Path
    spill_begins: np.ndarray  # conversation c occupies spill_lengths[c] tokens from spill_begins[c]
    spill_lengths: np.ndarray
    conversations: np.ndarray  # pack p is conversations[pack_offsets[p]:pack_offsets[p + 1]]
    pack_offsets: np.ndarray
    pack_starts: np.ndarray  # each pack's first token in the output
    regions: RegionWriter
    gather_tokens: int

    def __call__(self, first: int, last: int) -> int:
        """Fills packs [first, last): consecutive in the output, so gathered chunk by chunk into one
        buffer per file (positional reads) and written with one positional write per chunk and file."""
        convs = self.conversations[self.pack_offsets[first] : self.pack_offsets[last]]
        begins, sizes = self.spill_begins[convs], self.spill_lengths[convs].astype(np.int64)
        placed = np.concatenate([[0], np.cumsum(sizes)])  # each conversation's offset from the run's start
        capacity = max(self.gather_tokens, int(sizes.max(initial=0)))
        buffers = [np.empty(min(capacity, int(placed[-1])), dtype) for dtype in (TOKEN_DTYPE, MASK_DTYPE)]
        spills = (self.spill_ids, self.spill_mask)
        fds = [os.open(path, os.O_RDONLY) for path in spills]
        try:
            i = 0
            while i < len(convs):
                # conversations i..j-1: as many as fit the buffer (at least one: it holds the longest)
                j = max(i + 1, int(np.searchsorted(placed, placed[i] + capacity, side="right")) - 1)
                n = int(placed[j] - placed[i])
                for fd, buffer, path in zip(fds, buffers, spills, strict=True):
                    _read_runs(fd, buffer[:n], begins[i:j], sizes[i:j], path)
                self.regions.write(int(self.pack_starts[first] + placed[i]), buffers[0][:n], buffers[1][:n])
                i = j
        finally:
            for fd in fds:
                os.close(fd)
        return last - first


def _read_runs(fd: int, out: np.ndarray, begins: np.ndarray, sizes: np.ndarray, path: Path) -> None:
    """Reads the runs of `sizes` items from item `begins` of the file `fd` (items of `out`'s dtype) one
    after another into `out`: positional reads, straight from the page cache into the buffer."""
    view, item = memoryview(out).cast("B"), out.itemsize
    at = 0
    for begin, size in zip(begins.tolist(), sizes.tolist(), strict=True):
        offset, end = begin * item, at + size * item
        while at < end:
            got = os.preadv(fd, [view[at:end]], offset)
            if got == 0:
                raise EOFError(f"{path} ends at byte {offset:,}, before the conversations it should hold")
            at, offset = at + got, offset + got


_fill: _PackFiller | None = None


def _run_fill(task: tuple[int, int]) -> int:
    """Fills the packs [first, last) (in this process or a forked worker)."""
    assert _fill is not None
    return _fill(*task)


def _contiguous_runs(sizes: list[int], parts: int) -> list[tuple[int, int]]:
    """[first, last) runs of consecutive items, about `parts` of them with similar total size."""
    if not sizes:
        return []
    bounds = np.searchsorted(np.cumsum(sizes), np.linspace(0, sum(sizes), parts + 1)[1:-1], side="right")
    edges = sorted({0, *bounds.tolist(), len(sizes)})
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


# ----------------------------------------------------------------------------------------------------
# The whole run


def preprocess(cfg: PreprocessConfig, command: list[str] | None = None) -> dict[str, Any]:
    """Runs the stages and returns the metadata written to PREFIX_meta.json."""
    cfg.validate()
    timer = _StageTimer()
    backend = load_backend_tokenizer(cfg.tokenizer)
    Path(cfg.output_prefix).parent.mkdir(parents=True, exist_ok=True)
    spill = (Path(f"{cfg.output_prefix}_spill_ids.partial"), Path(f"{cfg.output_prefix}_spill_mask.partial"))
    valid_prefix = validation_prefix(cfg.output_prefix)
    try:
        timer.done("load tokenizer")
        tok = tokenise_to_spill(cfg, backend.to_str(), *spill)
        if len(tok.lengths) == 0:
            raise InputError(f"no conversation of {cfg.input} survived preprocessing: {dict(tok.dropped)}")
        timer.done("tokenise")
        train, valid = np.flatnonzero(~tok.held_out), np.flatnonzero(tok.held_out)
        if len(train) == 0:
            raise InputError(
                f"--valid-fraction {cfg.valid_fraction} held out all {len(valid)} conversations: lower it"
            )
        split = {
            "valid_fraction": cfg.valid_fraction,
            "seed": cfg.seed,
            "train_conversations": len(train),
            "valid_conversations": len(valid),
        }
        for stale in dataset_files(valid_prefix):  # from an earlier run (replacing it needs --force)
            stale.unlink(missing_ok=True)
        vocab_size = backend.get_vocab_size(with_added_tokens=True)
        dataset = functools.partial(_write_dataset, cfg, tok, spill, vocab_size, command, timer)
        if len(valid):
            dataset(valid_prefix, valid, {**split, "role": "valid"})
            split["valid_prefix"] = Path(valid_prefix).name
        elif cfg.valid_fraction > 0:
            log.warning(
                "--valid-fraction %s held out none of %d conversations", cfg.valid_fraction, len(train)
            )
        meta = dataset(cfg.output_prefix, train, {**split, "role": "train"})
        log.info("stage times: %s", timer)
    except BaseException:
        for partial_output in dataset_files(valid_prefix):  # never a held-out set without its training set
            partial_output.unlink(missing_ok=True)
        raise
    finally:
        for path in spill:
            path.unlink(missing_ok=True)
    return meta


def _write_dataset(
    cfg: PreprocessConfig,
    tok: TokeniseResult,
    spill: tuple[Path, Path],
    vocab_size: int,
    command: list[str] | None,
    timer: _StageTimer,
    prefix: str | Path,
    members: np.ndarray,
    split: dict[str, Any],
) -> dict[str, Any]:
    """Packs and writes the conversations `members` (indices in spill order) as the dataset `prefix`."""
    role = split["role"]
    lengths = tok.lengths[members]
    plan = best_fit_decreasing(padded_lengths(lengths, cfg.pad_multiple), cfg.seq_length, seed=cfg.seed)
    plan = plan.shuffled(cfg.seed)
    timer.done(f"pack {len(members)} {role} conversations")
    with PackedWriter(prefix, cfg.seq_length, cfg.pad_multiple) as writer:
        write_packs(plan, members, tok.lengths, *spill, writer, cfg.workers, desc=f"write {role}")
        timer.done(f"write {plan.num_packs} {role} packs")
        with atomic_output(histogram_path(prefix)) as png:
            title = f"{Path(prefix).name}: {len(members)} conversations"
            save_histogram_png(lengths, cfg.seq_length, png, title)
        meta = writer.commit(_metadata(cfg, tok, members, plan, vocab_size, command, split))
    timer.done(f"{role} statistics and commit")
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
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.stages)


def _metadata(
    cfg: PreprocessConfig,
    tok: TokeniseResult,
    members: np.ndarray,
    plan: PackPlan,
    vocab_size: int,
    command,
    split: dict[str, Any],
) -> dict[str, Any]:
    """The meta of the dataset of conversations `members`; rows read and dropped are the input's."""
    lengths, full_lengths = tok.lengths[members], tok.full_lengths[members]
    total_tokens = int(lengths.sum(dtype=np.int64))
    truncated = int((full_lengths > lengths).sum())
    dropped = {r: tok.dropped[r] for r in conversation.DROP_REASONS if tok.dropped[r]}
    pack_tokens = plan.pack_tokens(lengths)
    padded_tokens = plan.pack_tokens(padded_lengths(lengths, cfg.pad_multiple))
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
        "split": split,
        "stats": {
            "rows_read": tok.rows,
            "conversations": int(len(lengths)),
            "dropped": dropped,
            "truncated": truncated,
            "tokens": total_tokens,
            "loss_tokens": int(tok.loss_tokens[members].sum()),
            "tokens_lost_to_truncation": int((full_lengths - lengths).sum()),
            "packs": plan.num_packs,
            "packing_efficiency": round(total_tokens / (plan.num_packs * cfg.seq_length), 6),
            "packing_efficiency_padded": round(
                int(padded_tokens.sum()) / (plan.num_packs * cfg.seq_length), 6
            ),
            "conversations_per_pack": round(len(lengths) / plan.num_packs, 3),
            "max_pack_tokens": int(pack_tokens.max()),
            "max_pack_tokens_padded": int(padded_tokens.max()),
            "lengths": length_summary(lengths),
            "length_histogram_log2": [list(row) for row in log2_histogram(lengths, cfg.seq_length)],
            "per_subset": tok.per_subset[split["role"]],
        },
    }


def report(meta: dict[str, Any]) -> str:
    """A human-readable summary of PREFIX_meta.json."""
    stats = meta["stats"]
    lines = [
        f"conversations   {stats['conversations']:>12,} of {stats['rows_read']:,} rows  (truncated "
        f"{stats['truncated']:,}, "
        f"{stats['tokens_lost_to_truncation']:,} tokens cut)",
        f"dropped         {sum(stats['dropped'].values()):>12,}  {stats['dropped'] or ''}",
        f"tokens          {stats['tokens']:>12,}  (loss tokens {stats['loss_tokens']:,}, "
        f"{stats['loss_tokens'] / stats['tokens']:.1%})",
        f"packs           {stats['packs']:>12,}  x {meta['seq_length']} tokens, efficiency "
        f"{stats['packing_efficiency']:.4%} ({stats['packing_efficiency_padded']:.4%} with conversations "
        "padded to "
        f"multiples of {meta['pad_multiple']}), {stats['conversations_per_pack']} conversations/pack",
        "length          "
        + "  ".join(f"{k}={v}" for k, v in stats["lengths"]["percentiles"].items())
        + f"  max={stats['lengths']['max']}",
    ]
    split = meta.get("split") or {}
    if split.get("valid_conversations"):
        lines.append(
            f"held out        {split['valid_conversations']:>12,}  conversations (--valid-fraction "
            f"{split['valid_fraction']}, seed {split['seed']}) in {split['valid_prefix']}"
        )
    for subset, counts in stats["per_subset"].items():
        lines.append(
            f"  subset {subset or '(none)':<14} {counts['conversations']:>10,} conversations "
            f"{counts['tokens']:>14,} tokens"
        )
    lines.append("tokens per conversation:\n" + format_histogram(stats["length_histogram_log2"]))
    return "\n".join(lines)
