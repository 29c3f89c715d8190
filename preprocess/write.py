"""The packing plan + the spill files -> a packed dataset's token and mask files.

Every pack's place in the output is reserved first (`PackedWriter.reserve`); then worker processes
each copy the conversations of a contiguous run of packs from the spill files to their places, so the
files are the same for any worker count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from formats.packed import MASK_DTYPE, TOKEN_DTYPE, PackedWriter, RegionWriter

from .packing import PackPlan
from .workers import forked_unordered_map


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

    Each worker copies through a reused buffer of `gather_tokens` tokens: large writes, from a buffer
    small enough to stay in the CPU's cache between the gather and the write."""
    from tqdm import tqdm

    conversations = members[plan.order]  # pack by pack, as numbers in the spill files
    ends = np.cumsum(lengths, dtype=np.int64)
    fill = _PackFiller(
        spill_ids,
        spill_mask,
        spill_begins=ends - lengths,
        spill_lengths=lengths,
        conversations=conversations,
        pack_offsets=plan.offsets,
        pack_starts=writer.reserve(lengths[conversations], plan.offsets),
        regions=writer.region_writer(),
        gather_tokens=gather_tokens,
    )
    runs = contiguous_runs(plan.pack_tokens(lengths[members]).tolist(), parts=8 * workers)
    with tqdm(total=plan.num_packs, unit="pack", desc=desc) as bar:
        for packs_done in forked_unordered_map(fill, runs, workers):
            bar.update(packs_done)


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

    def __call__(self, run: tuple[int, int]) -> int:
        """Fills packs [first, last): consecutive in the output, so gathered chunk by chunk into one
        buffer per file (positional reads) and written with one positional write per chunk and file.
        Returns the number of packs filled."""
        first, last = run
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


def contiguous_runs(sizes: list[int], parts: int) -> list[tuple[int, int]]:
    """[first, last) runs of consecutive items, about `parts` of them with similar total size."""
    if not sizes:
        return []
    bounds = np.searchsorted(np.cumsum(sizes), np.linspace(0, sum(sizes), parts + 1)[1:-1], side="right")
    edges = sorted({0, *bounds.tolist(), len(sizes)})
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]
