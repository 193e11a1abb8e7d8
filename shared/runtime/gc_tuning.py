"""Python's cyclic garbage collector, set for long-running consumers.

With CPython's default thresholds (700, 10, 10) a consumer that keeps state in memory and
churns through documents every batch (conversation-state's customers, the sweeper's
deadlines, metrics' buckets) promotes many short-lived containers to the oldest generation,
so full collections run every two or three seconds under load and each one walks everything
the process holds: measured in ``make bench`` at 375 msg/s, conversation-state paused for
45-155 ms every ~2.5 s to collect 5-16 objects. Almost all of these objects are freed by reference counting anyway; cycles are
rare. So each service process:

- freezes what exists once it is built (modules, classes, settings: never garbage) so no
  collection walks it again (``gc.freeze``);
- collects the young generation after ``thresholds[0]`` net container allocations instead of
  700, the middle one every ``thresholds[1]`` young collections, the oldest every
  ``thresholds[2]`` middle ones (and, as always, only once its pending objects are a quarter
  of what it holds).

With (50,000, 20, 20): no full collection during such a step, and p99 to MessageAdded
155-176 ms instead of 196-570 (four 30 s runs). ``hometeam_gc_pause_seconds`` shows the
pauses per generation.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram


def tune(thresholds: tuple[int, int, int]) -> None:
    """Freeze everything alive now and set the collection thresholds (for the process's
    entry point, once the service is built)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)


class GcPauses:
    """``hometeam_gc_pause_seconds{generation}``: how long each collection held the process."""

    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float] = time.perf_counter) -> None:
        self.pauses = Histogram(
            "hometeam_gc_pause_seconds",
            "Garbage collection pauses of this process, by generation collected",
            ["generation"],
            registry=registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self._by_generation = [self.pauses.labels(generation=str(g)) for g in range(3)]
        self.clock = clock
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = self.clock()
        else:
            self._by_generation[info["generation"]].observe(self.clock() - self._started)

    def start(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
