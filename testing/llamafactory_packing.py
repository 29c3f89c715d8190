"""LLaMA-Factory's packing, reimplemented from its description, to compare the pipeline's best fit with
(tests/test_packing.py, bench/preprocess.py): ascending lengths per batch of 1,000 samples, each pack
filled by repeatedly taking the largest remaining length that fits.

    packs = llamafactory_greedy_knapsack(lengths, capacity=32768)   # each pack's list of lengths
"""

from __future__ import annotations

import bisect


def llamafactory_greedy_knapsack(lengths, capacity: int, batch_size: int = 1000) -> list[list[int]]:
    """LLaMA-Factory's packing (per batch of `batch_size` samples); returns the packs' lengths."""
    packs: list[list[int]] = []
    lengths = [int(x) for x in lengths]
    for b in range(0, len(lengths), batch_size):
        remaining = sorted(lengths[b : b + batch_size])
        while remaining:
            pack, room = [], capacity
            while True:
                i = bisect.bisect_right(remaining, room) - 1  # largest length that fits
                if i < 0:
                    break
                room -= remaining[i]
                pack.append(remaining.pop(i))
            if not pack:
                raise ValueError(f"a length exceeds the capacity {capacity}")
            packs.append(pack)
    return packs
