"""The two ways the preprocessor spreads work over processes.

* `ordered_map`: tokenising. Spawned workers (no inherited state: the tokenizer's thread pool must
  not be forked; one worker runs in this process), tasks and results pickled, results yielded in
  input order with a bounded number in flight, so the output does not depend on the worker count
  and memory does not grow with the input.
* `forked_unordered_map`: writing packs. Forked workers inherit the task function with its arrays
  (the plan, the offsets) instead of receiving them pickled with every task; results come back in
  completion order, so the function must not depend on the order it runs in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

Task = TypeVar("Task")
Result = TypeVar("Result")


def ordered_map(
    function: Callable[[Task], Result],
    tasks: Iterable[Task],
    workers: int,
    initializer: Callable[[], None] | None = None,
) -> Iterator[Result]:
    """`function` over `tasks` in `workers` spawned processes, in input order.

    At most `4 * workers` tasks are in flight (Pool.imap would read the whole input ahead).
    `function` must be picklable (a module-level function or a functools.partial of one). One worker
    runs here, in this process: the same results without a process to start.
    """
    if workers == 1:
        yield from map(function, tasks)
        return
    import multiprocessing as mp

    window = 4 * workers
    with mp.get_context("spawn").Pool(workers, initializer=initializer) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(function, (task,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# The function the forked workers of `forked_unordered_map` run: set only while its pool exists,
# so that a fork inherits it (the one piece of module state, and the reason for it).
_inherited: Callable[[Any], Any] | None = None


def forked_unordered_map(
    function: Callable[[Task], Result], tasks: Sequence[Task], workers: int
) -> Iterator[Result]:
    """`function` over `tasks` in `workers` forked processes (here for one worker or one task),
    results in completion order."""
    global _inherited
    if workers == 1 or len(tasks) <= 1:
        yield from map(function, tasks)
        return
    import multiprocessing as mp

    _inherited = function
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            yield from pool.imap_unordered(_run_inherited, tasks)
    finally:
        _inherited = None


def _run_inherited(task: Any) -> Any:
    assert _inherited is not None, "forked_unordered_map's workers run only inside it"
    return _inherited(task)
