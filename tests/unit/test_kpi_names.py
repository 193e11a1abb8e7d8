"""metrics' names of hourly buckets and daily counted-event collections: remembered, and
the same as formatting each time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.metrics import store
from services.metrics.kpis import hour_of
from services.metrics.store import bucket_id, counted_events_collection

PLUS_2 = timezone(timedelta(hours=2))
MINUS_5 = timezone(timedelta(hours=-5))


@pytest.mark.parametrize(
    ("at", "collection", "hour_text"),
    [
        (datetime(2026, 12, 4, 23, 59, 59, 999_999, tzinfo=UTC), "kpi_counted_20261204", "2026-12-04T23"),
        (datetime(2026, 12, 5, 0, 0, tzinfo=UTC), "kpi_counted_20261205", "2026-12-05T00"),
        (datetime(2026, 12, 5, 1, 30, tzinfo=PLUS_2), "kpi_counted_20261204", "2026-12-05T01"),  # 23:30 UTC
        (datetime(2026, 12, 4, 20, 0, tzinfo=MINUS_5), "kpi_counted_20261205", "2026-12-04T20"),  # 01:00 UTC
        (datetime(1969, 12, 31, 23, 0, tzinfo=UTC), "kpi_counted_19691231", "1969-12-31T23"),
    ],
)
def test_names(at: datetime, collection: str, hour_text: str) -> None:
    for _ in range(2):  # formatted, then remembered
        assert counted_events_collection(at) == collection
        assert bucket_id(hour_of(at), "team-a", "ev/3") == f"{hour_text}|team-a|ev/3"


def test_the_same_instant_in_another_offset_keeps_its_own_hour() -> None:
    utc = datetime(2026, 12, 4, 10, tzinfo=UTC)
    assert bucket_id(utc, "t", "w").startswith("2026-12-04T10|")
    assert bucket_id(utc.astimezone(PLUS_2), "t", "w").startswith("2026-12-04T12|")
    assert bucket_id(utc, "t", "w").startswith("2026-12-04T10|")


def test_remembered_names_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "_REMEMBERED", 5)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for n in range(40):
        at = start + timedelta(hours=7 * n)
        assert counted_events_collection(at) == "kpi_counted_" + at.strftime("%Y%m%d")
        assert bucket_id(hour_of(at), "t", "w") == at.strftime("%Y-%m-%dT%H") + "|t|w"
        assert len(store._DAY_NAMES) <= 5 and len(store._HOUR_TEXTS) <= 5
