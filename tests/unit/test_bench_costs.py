"""The pipeline benchmark's per-message costs: CPU, Kafka records and store writes of a step,
divided by the messages it completed."""

from __future__ import annotations

import pytest

from bench.pipeline import at_or_before, message_costs


def test_costs_are_the_step_deltas_per_message() -> None:
    costs = message_costs(
        100,
        {"ingest": {"cpu_seconds": 0.05}, "conversation_state": {"cpu_seconds": 0.1}, "kafka": {"cpu_seconds": 0.02},
         "ferretdb": {"cpu_seconds": 0.08}, "bench": {"cpu_seconds": 1.0}},
        ({"channel.inbound.v1": 1000, "messages.received.v1": 40}, {"channel.inbound.v1": 1100, "messages.received.v1": 140}),
        ({"ingest": 1000, "conversation-state": 40}, {"ingest": 1100, "conversation-state": 190}),
        {"conversation_state": (
            {("written", "customers", "update"): 10.0, ("commands", "customers", "update"): 2.0},
            {("written", "customers", "update"): 60.0, ("commands", "customers", "update"): 7.0,
             ("written", "messages", "insert"): 100.0, ("commands", "messages", "find"): 3.0},
        )},
        "channel.inbound.v1",
    )
    assert costs["cpu_ms"]["ingest"] == pytest.approx(0.5)
    assert costs["cpu_ms_services"] == pytest.approx(1.5)  # the bench's own CPU is not the pipeline's
    assert costs["cpu_ms_total"] == pytest.approx(1.5 + 0.2 + 0.8)
    # What the bench itself sent is not a record the pipeline produced.
    assert costs["records_produced"] == {"messages.received.v1": 1.0}
    assert costs["records_consumed"] == {"ingest": 1.0, "conversation-state": 1.5}
    assert costs["store_documents_written"] == {"conversation_state/customers/update": 0.5, "conversation_state/messages/insert": 1.0}
    assert costs["store_written_by_command"] == {"update": 0.5, "insert": 1.0}
    assert costs["store_reads"] == pytest.approx(0.03)


def test_a_step_that_completed_nothing_has_no_costs() -> None:
    assert message_costs(0, {}, ({}, {}), ({}, {}), {}, "channel.inbound.v1") == {}


@pytest.mark.parametrize(
    ("t", "expected"),
    [(0.5, {"a": 1}), (1.0, {"a": 1}), (2.5, {"a": 2}), (9.0, {"a": 3})],
)
def test_at_or_before_takes_the_last_sample_not_after_t(t: float, expected: dict) -> None:
    assert at_or_before([(1.0, {"a": 1}), (2.0, {"a": 2}), (3.0, {"a": 3})], t) == expected
