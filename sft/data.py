"""Packed SFT data for the trainer: the indexed files of tools/preprocess_sft.py -> THD micro-batches.

    dataset = PackedDataset("/data/am")                 # PREFIX_input_ids / _loss_mask / _meta.json
    order = PackOrder([len(dataset)], weights=None, seed=1234)
    packs = [dataset[i] for _, i in order.slots(consumed_samples, count)]
    batch = make_micro_batch(packs, seq_length=32768)

On disk one Megatron *document* is one pack and each *sequence* in it one conversation (see
formats/packed.py). A micro-batch concatenates its packs into a single THD row of
`micro_batch_size x seq_length` tokens, padded at the end by one segment without loss, so every
micro-batch has the same shape (pipeline stages exchange fixed-size activations). Within the row:

- `cu_seqlens` are the conversation boundaries; attention never crosses them;
- position ids restart at 0 in every conversation;
- the label at position t is the token at t+1 of the same conversation, and it is trained when the
  loss mask of that token is set; the last position of a conversation has no target;
- with context parallelism every conversation is padded to a multiple of 2 x CP (x TP with sequence
  parallelism) inside its own segment, so cu_seqlens == cu_seqlens_padded; the packs still fit the
  row because preprocessing packed the lengths rounded up to its --pad-multiple (`layout_problems`).

The sample stream is an endless sequence of epochs; epoch e visits every pack exactly once, in an
order drawn from (seed, e). With several prefixes and weights, an epoch takes round(w_i / sum(w) x
total packs) packs of prefix i, cycling through a seeded permutation of that prefix, so over- and
under-sampling repeat or skip packs evenly. The data position of a run is the number of consumed
samples: slots [consumed, consumed + global batch) form the next global batch, whatever the
parallel layout, which is what makes resumption and layout changes exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import DataError
from formats.chat_template import TEMPLATES
from formats.packed import Pack, PackedDataset, padded_lengths, validation_prefix
from plan.layout import ParallelLayout


class PackOrder:
    """Maps the global sample stream (slot 0, 1, 2, ...) to (prefix number, pack) pairs (module doc)."""

    def __init__(self, sizes: list[int], weights: list[float] | None, seed: int):
        if not sizes or min(sizes) < 1:
            raise DataError(f"every data prefix needs at least one pack; sizes {sizes}")
        self.sizes, self.seed = list(sizes), seed
        total = sum(sizes)
        if weights is None:
            self.per_epoch = list(sizes)
        else:
            self.per_epoch = [max(1, round(w / sum(weights) * total)) for w in weights]
        self.epoch_size = sum(self.per_epoch)
        self._cached_epoch: tuple[int, np.ndarray] | None = None

    def _prefix_stream(self, prefix: int, start: int, count: int) -> np.ndarray:
        """Packs [start, start + count) of prefix `prefix`'s endless stream of seeded permutations."""
        size, out = self.sizes[prefix], []
        cycle, offset = divmod(start, size)
        while count > 0:
            permutation = np.random.default_rng([self.seed, prefix, cycle]).permutation(size)
            take = permutation[offset : offset + count]
            out.append(take)
            count -= len(take)
            cycle, offset = cycle + 1, 0
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def epoch(self, epoch: int) -> np.ndarray:
        """The [epoch_size, 2] (prefix, pack) order of one epoch."""
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            parts = [
                np.stack([np.full(n, i), self._prefix_stream(i, epoch * n, n)], axis=1)
                for i, n in enumerate(self.per_epoch)
            ]
            combined = np.concatenate(parts)
            shuffle = np.random.default_rng([self.seed, 1_000_003, epoch]).permutation(len(combined))
            self._cached_epoch = (epoch, combined[shuffle])
        return self._cached_epoch[1]

    def slots(self, start: int, count: int) -> list[tuple[int, int]]:
        out = []
        for slot in range(start, start + count):
            epoch, position = divmod(slot, self.epoch_size)
            prefix, pack = self.epoch(epoch)[position]
            out.append((int(prefix), int(pack)))
        return out


@dataclass
class MicroBatch:
    """One THD row: tensors are [1, T]; `cu_seqlens` int32 [segments + 1] (the padding is a segment).
    With context parallelism, segments are padded to a multiple of 2 x CP: `cu_seqlens_padded` holds
    the padded offsets, and after `split_for_context_parallel` the tensors hold this rank's tokens only
    (the offsets stay global, as Transformer Engine expects)."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    real_tokens: int  # tokens that are not padding, in the whole row
    cu_seqlens_padded: torch.Tensor | None = None

    def _apply(self, fn) -> MicroBatch:
        tensors = (self.tokens, self.position_ids, self.labels, self.loss_mask, self.cu_seqlens)
        padded = None if self.cu_seqlens_padded is None else fn(self.cu_seqlens_padded)
        return MicroBatch(*map(fn, tensors), self.max_seqlen, self.real_tokens, padded)

    def to(self, device) -> MicroBatch:
        return self._apply(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> MicroBatch:
        """Page-locked copies, so that the copy to the GPU runs asynchronously."""
        return self._apply(torch.Tensor.pin_memory)

    def packed_seq_params(self):
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            cu_seqlens_q_padded=self.cu_seqlens_padded,
            cu_seqlens_kv_padded=self.cu_seqlens_padded,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
        )


def make_micro_batch(
    packs: list[Pack],
    seq_length: int,
    pad_token_id: int = 0,
    *,
    pad_multiple: int = 1,
    width: int | None = None,
) -> MicroBatch:
    """Concatenates `packs` into one THD row of `width` tokens (default len(packs) x seq_length); see the
    module doc. With pad_multiple > 1 every conversation is padded to a multiple of it inside its own
    segment (the padding after its real tokens, without loss; causal attention keeps the real tokens
    from seeing it), so the segment offsets are the padded offsets (cu_seqlens == cu_seqlens_padded)."""
    width = width or len(packs) * seq_length
    ids = [p.input_ids for p in packs]
    mask = [p.loss_mask for p in packs]
    lengths = np.concatenate([p.lengths for p in packs]).astype(np.int64)
    real = int(lengths.sum())
    padded = padded_lengths(lengths, pad_multiple)
    if padded.sum() > width:
        raise DataError(
            f"{len(packs)} packs hold {real} tokens ({int(padded.sum())} padded), more than the row "
            f"width {width} ({len(packs)} x seq_length {seq_length})"
        )
    if pad_multiple > 1 and len(lengths):  # each conversation followed by its padding
        ids = np.concatenate(
            [
                np.concatenate([c, np.full(pl - len(c), pad_token_id, np.int32)])
                for c, pl in zip(np.split(np.concatenate(ids), np.cumsum(lengths)[:-1]), padded, strict=True)
            ]
        )
        mask = np.concatenate(
            [
                np.concatenate([c, np.zeros(pl - len(c), np.uint8)])
                for c, pl in zip(np.split(np.concatenate(mask), np.cumsum(lengths)[:-1]), padded, strict=True)
            ]
        )
    else:
        ids, mask = np.concatenate(ids), np.concatenate(mask)
    ids, mask = ids.astype(np.int64), mask.astype(np.float32)
    if len(ids) < width:  # one trailing segment of padding, attended only by itself and never trained
        tail = width - len(ids)
        ids = np.concatenate([ids, np.full(tail, pad_token_id, dtype=np.int64)])
        mask = np.concatenate([mask, np.zeros(tail, dtype=np.float32)])
        lengths, padded = np.concatenate([lengths, [tail]]), np.concatenate([padded, [tail]])
    starts = np.concatenate([[0], np.cumsum(padded)])
    positions = np.arange(width) - np.repeat(starts[:-1], padded)
    labels = np.zeros(width, dtype=np.int64)
    labels[:-1] = ids[1:]
    target = np.zeros(width, dtype=np.float32)
    target[:-1] = mask[1:]
    # No target at the last real position of a conversation nor on its padding (the next token belongs
    # to another conversation, whose first token may well carry loss).
    no_target = positions >= np.repeat(lengths, padded) - 1
    labels[no_target] = 0
    target[no_target] = 0.0
    row = lambda a: torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(0)  # noqa: E731
    segments = torch.from_numpy(np.concatenate([[0], np.cumsum(padded)]).astype(np.int32))
    return MicroBatch(
        row(ids),
        row(positions),
        row(labels),
        row(target),
        segments,
        int(padded.max()),
        real,
        segments if pad_multiple > 1 else None,
    )


def context_parallel_indices(cu_seqlens_padded: np.ndarray, cp_size: int, cp_rank: int) -> np.ndarray:
    """The row positions context-parallel rank `cp_rank` holds: each padded segment is cut into 2 x CP
    equal chunks and rank r takes chunks r and 2 CP - 1 - r, balancing causal attention work (the
    split Transformer Engine's THD attention expects, as its thd_get_partitioned_indices)."""
    out = []
    for start, end in zip(cu_seqlens_padded[:-1], cu_seqlens_padded[1:], strict=True):
        chunk = (end - start) // (2 * cp_size)
        for part in (cp_rank, 2 * cp_size - 1 - cp_rank):
            out.append(np.arange(start + part * chunk, start + (part + 1) * chunk))
    return np.concatenate(out)


def split_for_context_parallel(batch: MicroBatch, cp_size: int, cp_rank: int) -> MicroBatch:
    """This context-parallel rank's share of a row built with pad_multiple = 2 x CP (labels were taken
    from the whole row first, so no target is lost at a chunk boundary)."""
    if cp_size == 1:
        return batch
    index = torch.from_numpy(context_parallel_indices(batch.cu_seqlens_padded.numpy(), cp_size, cp_rank))
    take = lambda t: t.index_select(1, index)  # noqa: E731
    return MicroBatch(
        take(batch.tokens),
        take(batch.position_ids),
        take(batch.labels),
        take(batch.loss_mask),
        batch.cu_seqlens,
        batch.max_seqlen,
        batch.real_tokens,
        batch.cu_seqlens_padded,
    )


def layout_problems(datasets: list[PackedDataset], layout: ParallelLayout) -> list[str]:
    """Why rows of these datasets cannot serve `layout`: their conversations must have been packed with a
    padding multiple that the layout's (2 x CP, x TP with sequence parallelism) divides."""
    need = layout.pad_multiple
    return [
        f"the layout pads every conversation to a multiple of {need} (2 x parallel.context"
        f"{' x parallel.tensor' if layout.sequence_parallel else ''}), but {d.prefix} was packed with "
        f"--pad-multiple {d.pad_multiple}: re-run tools/preprocess_sft.py with a --pad-multiple that is "
        f"a multiple of {need} (the default, 64, serves every layout up to 2 x CP x TP = 64)"
        for d in datasets
        if d.pad_multiple % need
    ]


class SFTData:
    """The run's data: datasets of every prefix, their order, and the micro-batches of each global batch."""

    def __init__(self, prefixes: list[str], weights: list[float] | None, seed: int):
        self.datasets = [PackedDataset(p) for p in prefixes]
        lengths = {d.seq_length for d in self.datasets}
        if len(lengths) > 1:
            raise DataError(
                f"data prefixes were packed at different seq lengths {sorted(lengths)}: "
                "preprocess them with one --seq-length"
            )
        self.seq_length = lengths.pop()
        templates = {d.chat_template for d in self.datasets}
        if len(templates) > 1:
            raise DataError(
                "data prefixes were encoded with different chat templates "
                f"{sorted(map(str, templates))}: preprocess them with one template (the release serves one)"
            )
        self.chat_template = templates.pop()
        thinking = {d.enable_thinking for d in self.datasets}
        if len(thinking) > 1 and getattr(TEMPLATES.get(self.chat_template), "reasoning", False):
            raise DataError(
                f"data prefixes were encoded with the {self.chat_template} template with and without "
                "--enable-thinking: preprocess them with one setting (the release serves one)"
            )
        self.enable_thinking = all(thinking)
        self.order = PackOrder([len(d) for d in self.datasets], weights, seed)

    @property
    def training_data(self) -> dict[str, Any]:
        """What a checkpoint records of its data for the release: the chat template and its setting."""
        return {"chat_template": self.chat_template, "enable_thinking": self.enable_thinking}

    def iterations(self, epochs: int, global_batch_size: int) -> int:
        """Optimizer steps for `epochs` passes; the < 1 global batch left over at the end is not trained."""
        return epochs * self.order.epoch_size // global_batch_size

    def layout_problems(self, layout: ParallelLayout) -> list[str]:
        return layout_problems(self.datasets, layout)

    def row_width(self, layout: ParallelLayout) -> int:
        """Every THD row is micro_batch_size packs of seq_length tokens, padding included (the packs were
        made to fit once padded: see `layout_problems`)."""
        return layout.micro_batch_size * self.seq_length

    def micro_batches(
        self,
        consumed: int,
        global_batch_size: int,
        layout: ParallelLayout,
        data_parallel_rank: int,
        data_parallel_size: int,
        context_parallel_rank: int = 0,
        loss_group_size: int | None = None,
    ) -> list[MicroBatch]:
        """This data-parallel rank's micro-batches of the global batch starting at slot `consumed`, each row
        split across the layout's context-parallel ranks (this one's share). With `loss_group_size`, the
        loss mask carries the recipe's per-group weights (`group_loss_weights`)."""
        per_rank, size = global_batch_size // data_parallel_size, layout.micro_batch_size
        start = consumed + data_parallel_rank * per_rank
        packs = [self.datasets[prefix][pack] for prefix, pack in self.order.slots(start, per_rank)]
        if loss_group_size is not None:
            weights = self.group_loss_weights(consumed, global_batch_size, loss_group_size)
            mine = weights[start - consumed : start - consumed + per_rank]
            packs = [Pack(p.input_ids, p.loss_mask * w, p.lengths) for p, w in zip(packs, mine, strict=True)]
        width, pad = self.row_width(layout), layout.pad_multiple
        rows = [
            make_micro_batch(packs[i : i + size], self.seq_length, pad_multiple=pad, width=width)
            for i in range(0, per_rank, size)
        ]
        return [split_for_context_parallel(row, layout.context, context_parallel_rank) for row in rows]

    def group_loss_weights(self, consumed: int, global_batch_size: int, group_size: int) -> np.ndarray:
        """Per pack of the global batch at `consumed`, the weight that turns megatron-core's global
        per-token loss into the recipe's: the mean over groups of `group_size` consecutive packs (in the
        global order, so the same groups at every layout) of each group's per-token mean. A loss token
        of group g weighs N / (G x N_g), with N_g the loss tokens of the group, G groups and N of them in
        all: then sum(weight x token loss) / N = mean_g (S_g / N_g), and the weights' sum is still N."""
        slots = self.order.slots(consumed, global_batch_size)
        targets = np.array([self._loss_targets(prefix, pack) for prefix, pack in slots], dtype=np.float64)
        per_group = targets.reshape(-1, group_size).sum(axis=1)
        groups, total = len(per_group), targets.sum()
        weight = np.divide(total, groups * per_group, out=np.zeros_like(per_group), where=per_group > 0)
        return np.repeat(weight, group_size)

    def _loss_targets(self, prefix: int, pack: int) -> int:
        """Trained positions of a pack: loss-mask tokens that are not the first of their conversation
        (a conversation's first token is nobody's target)."""
        data = self.datasets[prefix][pack]
        starts = np.concatenate([[0], np.cumsum(data.lengths)[:-1]]).astype(np.int64)
        return int(data.loss_mask.sum(dtype=np.int64) - data.loss_mask[starts].sum(dtype=np.int64))

    def conversation_lengths(self, consumed: int, global_batch_size: int) -> np.ndarray:
        """Lengths of every conversation in the global batch at `consumed` (for FLOP counting)."""
        slots = self.order.slots(consumed, global_batch_size)
        return np.concatenate([self.datasets[prefix].conversation_lengths(pack) for prefix, pack in slots])


def default_valid_prefixes(train_prefixes: list[str]) -> list[str]:
    """The held-out datasets preprocess_sft.py --valid-fraction wrote next to the training prefixes."""
    found = [validation_prefix(p) for p in train_prefixes]
    return [p for p in found if Path(f"{p}_meta.json").is_file()]


_EMPTY_PACK = Pack(np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(0, np.int32))


class ValidationData:
    """The held-out packs, in file order (the first `max_packs`), dealt to the data-parallel ranks in
    rows of micro_batch_size packs: rank r takes a contiguous block of rows. The last rows are completed
    with empty packs (no loss tokens), so every rank runs the same number of micro-batches and the
    validation loss, a sum over loss tokens divided by their count, does not depend on the layout."""

    def __init__(self, prefixes: list[str], seq_length: int, max_packs: int | None = None):
        self.datasets = [PackedDataset(p) for p in prefixes]
        for dataset in self.datasets:
            if dataset.seq_length != seq_length:
                raise DataError(
                    f"{dataset.prefix} was packed at seq length {dataset.seq_length}, the training data at "
                    f"{seq_length}: hold out with the same tools/preprocess_sft.py run"
                )
        self.seq_length = seq_length
        self.packs = [(i, j) for i, d in enumerate(self.datasets) for j in range(len(d))][:max_packs]

    def micro_batch_count(self, layout: ParallelLayout, data_parallel_size: int) -> int:
        """Micro-batches per data-parallel rank (a multiple of PP with interleaved stages, as megatron-core's
        interleaved schedule requires)."""
        rows = -(-len(self.packs) // layout.micro_batch_size)
        count = -(-rows // data_parallel_size)
        group = layout.pipeline if layout.virtual_pipeline else 1
        return -(-count // group) * group

    def micro_batches(
        self,
        layout: ParallelLayout,
        data_parallel_rank: int,
        data_parallel_size: int,
        context_parallel_rank: int = 0,
    ) -> Iterator[MicroBatch]:
        """This rank's rows, built one at a time (the held-out set may be large)."""
        size, count = layout.micro_batch_size, self.micro_batch_count(layout, data_parallel_size)
        width = size * self.seq_length
        for row in range(data_parallel_rank * count, (data_parallel_rank + 1) * count):
            slots = self.packs[row * size : (row + 1) * size]
            packs = [self.datasets[i][j] for i, j in slots] or [_EMPTY_PACK]
            batch = make_micro_batch(packs, self.seq_length, pad_multiple=layout.pad_multiple, width=width)
            yield split_for_context_parallel(batch, layout.context, context_parallel_rank)
