"""The bench's summary of conversation-state's batch phases between two scrapes."""

from __future__ import annotations

import pytest

from bench.pipeline import phase_summary, phase_table

INF = float("inf")


def test_a_phase_between_two_scrapes_counts_only_the_batches_in_between() -> None:
    before = {"journal": {"buckets": [(0.01, 4), (0.1, 4), (INF, 4)], "sum": 0.02}}
    after = {
        "journal": {"buckets": [(0.01, 4), (0.1, 14), (INF, 14)], "sum": 0.52},
        "waited": {"buckets": [(0.01, 0), (0.1, 2), (INF, 2)], "sum": 0.1},
    }
    out = phase_summary(before, after, seconds=10.0)
    assert out["journal"]["batches"] == 10
    assert out["journal"]["mean"] == pytest.approx(0.05)
    assert out["journal"]["p50"] == pytest.approx(0.055)  # halfway into (0.01, 0.1]
    assert out["journal"]["busy_share"] == pytest.approx(0.05)
    assert out["waited"]["batches"] == 2
    assert out["waited"]["busy_share"] is None  # overlaps the other phases


def test_the_table_lists_the_phases_in_the_order_a_batch_passes_them() -> None:
    phases = {
        name: {"batches": 3, "mean": 0.01, "p50": 0.01, "p99": 0.02, "busy_share": 0.1}
        for name in ("finish", "journal", "read")
    }
    phases["waited"] = {"batches": 3, "mean": 0.04, "p50": 0.04, "p99": 0.08, "busy_share": None}
    text = phase_table({"steps": [{"label": "r1000", "rate": 1000, "conversation_state_phases_s": phases}]})
    row = text.splitlines()[1]
    assert row.index("waited 40.0/80.0") < row.index("read") < row.index("journal") < row.index("finish")
    assert "(10%)" in row


def test_runs_without_phases_print_no_table() -> None:
    assert phase_table({"steps": [{"label": "r1000", "rate": 1000}]}) == ""
