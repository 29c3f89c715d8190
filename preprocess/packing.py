"""The packing plan: which conversations share a packed sequence.

`best_fit_decreasing()` packs the whole dataset at once (not per preprocessing batch, as LLaMA-Factory
does): conversations sorted by length, longest first, each placed into the open pack with the least
room that still fits it, a new pack opened only when none fits. Ties between equal lengths are broken
by a seeded permutation, ties between packs with equal room by the most recently filled pack, so the
plan is a deterministic function of (lengths, capacity, seed).

`plan_packs()` is the plan the preprocessor writes: best-fit decreasing on lengths rounded up to the
trainer's padding multiple, then the packs in a seeded random order.

It runs on millions of lengths in seconds because it never places items one by one: packs are kept
in buckets by remaining room, and all conversations of one length are placed in bulk. A pack with room
r takes floor(r / s) conversations of length s in a row (after each placement it is still the best
fit), so a whole bucket absorbs a run of equal lengths in one step. This is exactly the item-by-item
algorithm; `tests/test_packing.py` checks it against a literal implementation.

LLaMA-Factory's own packing, for comparison, is in `testing/llamafactory_packing.py`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from formats.packed import padded_lengths


@dataclass(frozen=True)
class PackPlan:
    """Pack p holds conversations `order[offsets[p]:offsets[p + 1]]` (indices into the lengths array)."""

    order: np.ndarray  # int64, a permutation of all conversation indices
    offsets: np.ndarray  # int64, n_packs + 1
    capacity: int

    @property
    def num_packs(self) -> int:
        return len(self.offsets) - 1

    def pack(self, p: int) -> np.ndarray:
        return self.order[self.offsets[p] : self.offsets[p + 1]]

    def pack_tokens(self, lengths: np.ndarray) -> np.ndarray:
        """Tokens in each pack."""
        sums = np.concatenate([[0], np.cumsum(lengths[self.order], dtype=np.int64)])
        return sums[self.offsets[1:]] - sums[self.offsets[:-1]]

    def shuffled(self, seed: int) -> PackPlan:
        """The same packs in a seeded random order (so any prefix of the output is a fair sample)."""
        perm = np.random.default_rng(seed).permutation(self.num_packs)
        sizes = np.diff(self.offsets)[perm]
        order = np.concatenate([self.pack(p) for p in perm]) if len(perm) else self.order
        return PackPlan(order, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), self.capacity)


def plan_packs(lengths: np.ndarray, capacity: int, pad_multiple: int, seed: int) -> PackPlan:
    """Packs of at most `capacity` tokens even once each conversation is padded to `pad_multiple`, in a
    seeded random order (so any prefix of the output is a fair sample)."""
    plan = best_fit_decreasing(padded_lengths(lengths, pad_multiple), capacity, seed=seed)
    return plan.shuffled(seed)


def best_fit_decreasing(lengths: np.ndarray, capacity: int, seed: int = 0) -> PackPlan:
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"lengths must lie in [1, {capacity}]; got [{lengths.min()}, {lengths.max()}]")
    perm = np.random.default_rng(seed).permutation(n)
    by_length = perm[np.argsort(-lengths[perm], kind="stable")]  # longest first, seeded among equals
    sorted_lengths = lengths[by_length]
    pack_of = np.empty(n, dtype=np.int64)  # pack of the i-th longest conversation

    buckets: dict[int, list[int]] = {}  # room left -> packs with exactly that room (last = most recent)
    rooms: list[int] = []  # sorted keys of the non-empty buckets
    num_packs = 0

    def put(room: int, packs) -> None:
        if room == 0:
            return  # a full pack never takes anything again
        if room not in buckets:
            bisect.insort(rooms, room)
            buckets[room] = []
        buckets[room].extend(packs)

    # Runs of equal length, longest first.
    starts = np.flatnonzero(np.concatenate([[True], sorted_lengths[1:] != sorted_lengths[:-1]]))
    ends = np.append(starts[1:], n)
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        size, pos = int(sorted_lengths[start]), start
        while pos < end:
            count = end - pos
            j = bisect.bisect_left(rooms, size)
            if j == len(rooms):  # nothing open fits: new packs, each filled with as many as fit
                per_pack = capacity // size
                new = num_packs + np.arange(-(-count // per_pack), dtype=np.int64)
                num_packs += len(new)
                room, taken = capacity, new
            else:
                room = rooms[j]
                per_pack = room // size
                bucket = buckets[room]
                k = min(len(bucket), -(-count // per_pack))
                taken = np.array(bucket[len(bucket) - k :][::-1], dtype=np.int64)  # most recent first
                del bucket[len(bucket) - k :]
                if not bucket:
                    del buckets[room]
                    rooms.pop(j)
            placed = min(count, len(taken) * per_pack)
            pack_of[pos : pos + placed] = np.repeat(taken, per_pack)[:placed]
            last_count = placed - (len(taken) - 1) * per_pack
            put(room - per_pack * size, taken[:-1].tolist() if last_count < per_pack else taken.tolist())
            if last_count < per_pack:
                put(room - last_count * size, [int(taken[-1])])
            pos += placed

    grouped = np.argsort(pack_of, kind="stable")  # by pack, longest first within a pack
    counts = np.bincount(pack_of, minlength=num_packs)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return PackPlan(by_length[grouped].astype(np.int64), offsets, capacity)
