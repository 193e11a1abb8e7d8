"""The oldest-wait gauge between pool status changes: from the newest status known, stored or
not yet stored (pool statuses are stored behind a checkpoint)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry

from services.metrics.handlers import refresh_oldest_wait
from services.metrics.prom import KpiMetrics

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


class Stored:
    def __init__(self, docs: list[dict]) -> None:
        self.docs = docs

    async def all_pools(self) -> list[dict]:
        return self.docs


async def test_a_newer_unstored_status_wins_over_the_stored_one() -> None:
    registry = CollectorRegistry()
    metrics = KpiMetrics(registry)
    store = Stored(
        [
            {"_id": "pnw", "oldest_waiting_since": NOW - timedelta(minutes=20)},  # drained since, not stored yet
            {"_id": "std", "oldest_waiting_since": NOW - timedelta(seconds=90)},
        ]
    )
    seen = {"pnw": {"_id": "pnw", "oldest_waiting_since": None}}
    await refresh_oldest_wait(store, metrics, NOW, seen)  # type: ignore[arg-type]
    gauge = "hometeam_queue_oldest_wait_seconds"
    assert registry.get_sample_value(gauge, {"pool": "pnw"}) == 0.0
    assert registry.get_sample_value(gauge, {"pool": "std"}) == 90.0
