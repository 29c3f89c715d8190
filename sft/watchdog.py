"""A per-rank watchdog that ends a process whose training step (or validation) hangs.

A hung collective (another rank died, froze or lost its network) blocks every rank in it; torch's own
timeouts (the process-group timeout, NCCL's watchdog) fire only after `timeout_minutes`, which has to
cover the longest checkpoint save. Steps are far more regular than that, so each step is bounded by
`max(min_step_seconds, step_factor x the median of recent steps)` (`first_step_seconds` until one step
has completed): a daemon thread checks the step in progress, and past the bound logs which rank, which
iteration and which phase, dumps every thread's stack, and exits the process with `EXIT_HUNG`, so that
the job fails and the scheduler's requeue takes over instead of holding its GPUs.

Validation is watched too, with the bound of as many steps as its packs fill global batches (each
forward-only, so cheaper than a step); checkpoint saves and loads, whose length is the storage's, are
bounded by the process-group timeout alone.

    watchdog = StepWatchdog(WatchdogConfig(), rank=0)
    with watchdog.step(iteration=7):
        watchdog.phase("forward-backward")
        ...
    with watchdog.watch("validation", iteration=7, steps_worth=3.0):
        ...
"""

from __future__ import annotations

import faulthandler
import logging
import os
import statistics
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

EXIT_HUNG = 3  # the exit status of a process the watchdog ended


@dataclass
class WatchdogConfig:
    enabled: bool = True  # a hung step (a rank stuck in a collective): report its stacks and exit non-zero
    # a step is hung past max(min_step_seconds, step_factor x the median of the last 50 steps)
    step_factor: float = 10.0
    min_step_seconds: float = 300.0  # the bound is never below this
    first_step_seconds: float = 1800.0  # the bound until a step has completed (start-up, first batches)

    def problems(self) -> list[str]:
        if self.step_factor <= 1 or self.min_step_seconds <= 0 or self.first_step_seconds <= 0:
            return [
                "watchdog.step_factor must be > 1 and watchdog.min_step_seconds, first_step_seconds > 0 "
                f"(got {self.step_factor}, {self.min_step_seconds}, {self.first_step_seconds})"
            ]
        return []


class StepWatchdog:
    def __init__(self, config: WatchdogConfig, rank: int, poll_seconds: float = 1.0):
        self.config, self.rank = config, rank
        self._durations: deque[float] = deque(maxlen=50)
        self._lock = threading.Lock()
        # (iteration, start, steps' worth of bound) of the block in progress
        self._armed: tuple[int, float, float] | None = None
        self._phase = ""
        self._poll = poll_seconds
        self._closed = threading.Event()
        if config.enabled:
            threading.Thread(target=self._watch, name="step-watchdog", daemon=True).start()

    def close(self) -> None:
        """Stops watching (the thread ends within one poll interval)."""
        self._closed.set()

    def bound(self) -> float:
        """Seconds the next step may take."""
        c = self.config
        if not self._durations:
            return c.first_step_seconds
        return max(c.min_step_seconds, c.step_factor * statistics.median(self._durations))

    @contextmanager
    def step(self, iteration: int):
        """Watches the block as the step of `iteration`; its duration joins the median when it completes."""
        with self._watching(iteration, "start", 1.0) as started:
            yield
        with self._lock:
            self._durations.append(time.monotonic() - started)

    @contextmanager
    def watch(self, what: str, iteration: int, steps_worth: float):
        """Watches a collective block other than a step, e.g. validation, with the bound of `steps_worth`
        steps (at least one); its duration stays out of the steps' median."""
        with self._watching(iteration, what, max(1.0, steps_worth)):
            yield

    @contextmanager
    def _watching(self, iteration: int, phase: str, steps_worth: float):
        started = time.monotonic()
        with self._lock:
            self._armed, self._phase = (iteration, started, steps_worth), phase
        try:
            yield started
        finally:
            with self._lock:
                self._armed = None

    def phase(self, name: str) -> None:
        """Names what the step in progress is doing now (reported if it hangs there)."""
        self._phase = name

    def _watch(self) -> None:
        while not self._closed.wait(self._poll):
            with self._lock:
                armed, phase, bound = self._armed, self._phase, self.bound()
            if armed is not None and time.monotonic() - armed[1] > bound * armed[2]:
                self._fire(armed[0], phase, time.monotonic() - armed[1], bound, armed[2])

    def _fire(self, iteration: int, phase: str, elapsed: float, bound: float, steps_worth: float) -> None:
        c = self.config
        median = f"{statistics.median(self._durations):.2f} s" if self._durations else "none yet"
        worth = f"{steps_worth:g} steps' worth of " if steps_worth != 1 else ""
        log.error(
            "rank %d: iteration %d has spent %.0f s in phase '%s', past the bound of %.0f s (%s"
            "max(watchdog.min_step_seconds=%g, watchdog.step_factor=%g x median step %s)): a collective is "
            "probably hung on a rank that died or stalled; exiting with status %d so that the job fails "
            "and can be requeued. Stacks of this process:",
            self.rank,
            iteration,
            elapsed,
            phase,
            bound * steps_worth,
            worth,
            c.min_step_seconds,
            c.step_factor,
            median,
            EXIT_HUNG,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_HUNG)  # the main thread is stuck in the collective: no clean way out of it
