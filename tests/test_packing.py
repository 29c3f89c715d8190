"""Packing: best-fit decreasing against a literal one-item-at-a-time implementation, hand-worked
cases, invariants, determinism, and the comparison with LLaMA-Factory's per-batch greedy packing."""

from __future__ import annotations

import numpy as np
import pytest

from preprocess.packing import best_fit_decreasing
from testing.llamafactory_packing import llamafactory_greedy_knapsack


def literal_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Item by item: longest first; the fitting pack with the least room, ties to the most recently used."""
    packs: list[list[int]] = []
    room: list[int] = []
    last_used: list[int] = []
    for step, size in enumerate(sorted(lengths, reverse=True)):
        fitting = [p for p in range(len(packs)) if room[p] >= size]
        if fitting:
            p = min(fitting, key=lambda q: (room[q], -last_used[q]))
        else:
            packs.append([])
            room.append(capacity)
            last_used.append(-1)
            p = len(packs) - 1
        packs[p].append(size)
        room[p] -= size
        last_used[p] = step
    return packs


def plan_as_lengths(plan, lengths) -> list[list[int]]:
    return [sorted(lengths[plan.pack(p)].tolist(), reverse=True) for p in range(plan.num_packs)]


def test_hand_worked_example():
    lengths = np.array([2, 6, 3, 5, 2, 4])
    # 6 -> new A (room 4); 5 -> new B (5); 4 -> A (least room that fits, now 0); 3 -> B (2);
    # 2 -> B (0); 2 -> new C.
    plan = best_fit_decreasing(lengths, capacity=10)
    assert plan_as_lengths(plan, lengths) == [[6, 4], [5, 3, 2], [2]]
    assert sorted(plan.order.tolist()) == list(range(6))


@pytest.mark.parametrize("seed", range(40))
def test_bulk_placement_equals_the_literal_algorithm(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.choice([10, 17, 64, 100]))
    n = int(rng.integers(1, 120))
    if seed % 3 == 0:  # many repeats of few lengths: the bulk paths
        lengths = rng.choice(rng.integers(1, capacity + 1, size=4), size=n)
    else:
        lengths = rng.integers(1, capacity + 1, size=n)
    plan = best_fit_decreasing(lengths, capacity, seed=seed)
    assert plan_as_lengths(plan, lengths) == literal_best_fit_decreasing(lengths.tolist(), capacity)


def test_invariants_and_determinism_on_a_long_tail():
    rng = np.random.default_rng(7)
    capacity = 32768
    lengths = np.clip(rng.lognormal(np.log(3000), 1.0, 20000).astype(np.int64), 20, capacity - 1)
    plan = best_fit_decreasing(lengths, capacity, seed=3)
    assert np.array_equal(np.sort(plan.order), np.arange(len(lengths)))  # each conversation exactly once
    assert plan.pack_tokens(lengths).max() <= capacity
    for p in range(plan.num_packs):  # longest first within a pack
        assert np.all(np.diff(lengths[plan.pack(p)]) <= 0)
    again = best_fit_decreasing(lengths, capacity, seed=3)
    assert np.array_equal(plan.order, again.order) and np.array_equal(plan.offsets, again.offsets)
    other = best_fit_decreasing(lengths, capacity, seed=4)
    assert other.num_packs == plan.num_packs  # the seed only chooses among equal lengths
    assert not np.array_equal(other.order, plan.order)

    shuffled = plan.shuffled(5)
    assert sorted(map(tuple, (shuffled.pack(p).tolist() for p in range(shuffled.num_packs)))) == sorted(
        map(tuple, (plan.pack(p).tolist() for p in range(plan.num_packs)))
    )

    lf_packs = llamafactory_greedy_knapsack(lengths, capacity)
    assert sorted(x for pack in lf_packs for x in pack) == sorted(lengths.tolist())
    assert all(sum(pack) <= capacity for pack in lf_packs)
    assert plan.num_packs < len(lf_packs)
    assert lengths.sum() / (plan.num_packs * capacity) >= 0.995


def test_llamafactory_greedy_knapsack_hand_worked():
    # Ascending [1, 2, 3, 7, 8]; capacity 10: take 8, then the largest that fits 2 -> 2;
    # next pack 7, 3; then 1.
    assert llamafactory_greedy_knapsack([3, 8, 1, 7, 2], 10) == [[8, 2], [7, 3], [1]]
    # Batches never share a pack: two batches of 2 -> 2 packs although one would do.
    assert llamafactory_greedy_knapsack([1, 1, 1, 1], 10, batch_size=2) == [[1, 1], [1, 1]]


def test_rejects_lengths_outside_the_capacity():
    with pytest.raises(ValueError, match="lengths must lie in"):
        best_fit_decreasing(np.array([5, 11]), capacity=10)
    with pytest.raises(ValueError):
        best_fit_decreasing(np.array([0, 3]), capacity=10)
