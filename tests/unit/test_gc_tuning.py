"""The service processes' garbage collector settings and the pause histogram."""

from __future__ import annotations

import gc

import pytest
from prometheus_client import CollectorRegistry

from shared.runtime.gc_tuning import GcPauses, tune
from shared.settings import ServiceSettings


@pytest.fixture
def restored_gc():
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def _count(registry: CollectorRegistry, generation: str) -> float:
    return registry.get_sample_value("hometeam_gc_pause_seconds_count", {"generation": generation}) or 0.0


def test_tune_freezes_what_exists_and_sets_the_thresholds(restored_gc: None) -> None:
    gc.unfreeze()
    survivors = [{"built": n} for n in range(1_000)]  # alive when tuned: frozen, never walked again
    tune((50_000, 20, 20))
    assert gc.get_threshold() == (50_000, 20, 20)
    assert gc.get_freeze_count() >= len(survivors)


@pytest.mark.parametrize("generation", [0, 1, 2])
def test_each_collection_is_observed_under_its_generation(generation: int) -> None:
    registry = CollectorRegistry()
    pauses = GcPauses(registry)
    pauses.start()
    try:
        gc.collect(generation)
    finally:
        pauses.stop()
    assert _count(registry, str(generation)) >= 1
    assert registry.get_sample_value("hometeam_gc_pause_seconds_sum", {"generation": str(generation)}) >= 0


def test_stopped_pauses_observe_nothing_more() -> None:
    registry = CollectorRegistry()
    pauses = GcPauses(registry)
    pauses.start()
    pauses.start()  # once only
    assert gc.callbacks.count(pauses._callback) == 1
    pauses.stop()
    gc.collect()
    assert _count(registry, "2") == 0


def test_a_pause_is_the_time_between_start_and_stop() -> None:
    ticks = iter([10.0, 10.25])
    registry = CollectorRegistry()
    pauses = GcPauses(registry, clock=lambda: next(ticks))
    pauses._callback("start", {"generation": 2})
    pauses._callback("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
    assert registry.get_sample_value("hometeam_gc_pause_seconds_sum", {"generation": "2"}) == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (50_000, 20, 20)),
        ({"GC_THRESHOLDS": "[700, 10, 10]"}, (700, 10, 10)),
    ],
)
def test_thresholds_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: tuple[int, int, int]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert ServiceSettings().gc_thresholds == expected
