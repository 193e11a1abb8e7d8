"""Where a consumer's batches spend their time: ``hometeam_batch_phase_seconds{phase}``.

A batch's handling is a sequence of phases (read, apply, journal, publish, ...); the clock
marks the end of each, and each phase's duration is one observation of its histogram. So a
dashboard (or ``make bench``) can tell which phase makes a hop's tail, which the hop's
latency alone does not say. ``waited`` is apart: how long the batch's oldest record had
been in Kafka when the batch started (its producer's timestamp to now), the fetch wait and
the queue behind earlier batches together.

Observations are per batch, not per record (a few a batch, each ~1 µs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
WAITED = "waited"


class BatchPhases:
    """The phase histogram of one consumer; ``phases`` are the names its batches mark."""

    def __init__(
        self,
        registry: CollectorRegistry,
        phases: Sequence[str],
        clock: Callable[[], float] = time.perf_counter,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.histogram = Histogram(
            "hometeam_batch_phase_seconds",
            "Time a consumer's batches spend in each phase of their handling; 'waited' is how long a batch's oldest record was in Kafka when the batch started.",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=registry,
        )
        self._children = {p: self.histogram.labels(phase=p) for p in (WAITED, *phases)}
        self.clock = clock
        self.wall = wall

    def start(self, records: Sequence[Any] = ()) -> PhaseClock:
        """A clock for one batch, started now; ``records`` (with ``timestamp`` in ms) give ``waited``."""
        stamps = [r.timestamp for r in records if getattr(r, "timestamp", None)]
        if stamps:
            self._children[WAITED].observe(max(0.0, self.wall() - min(stamps) / 1000))
        return PhaseClock(self._children, self.clock)


class PhaseClock:
    __slots__ = ("_children", "_clock", "_last")

    def __init__(self, children: dict[str, Any], clock: Callable[[], float]) -> None:
        self._children = children
        self._clock = clock
        self._last = clock()

    def mark(self, phase: str) -> None:
        """The phase that ends now (it began at the previous mark, or the start)."""
        now = self._clock()
        self._children[phase].observe(now - self._last)
        self._last = now


class NoPhases:
    """A clock that records nothing (handlers built without ``BatchPhases``)."""

    def start(self, records: Sequence[Any] = ()) -> NoPhases:
        return self

    def mark(self, phase: str) -> None:
        pass
