"""The skeleton benchmark's traffic shape: which topics each stand-in writes for a record it
reads, and how many records each stage and topic get for a set of inbound messages."""

from __future__ import annotations

import zlib

import pytest

from bench.pipeline import make_population, plan_messages
from bench.skeleton import BUCKETS, COMMANDS, DECISIONS, EVENTS, INBOUND, RECEIVED, STAGES, Shape


def _value_in_bucket(lo: int, hi: int) -> bytes:
    """A record value whose bucket (crc32 mod BUCKETS) is in [lo, hi)."""
    for i in range(1_000_000):
        v = b"message %d" % i
        if lo <= zlib.crc32(v) % BUCKETS < hi:
            return v
    raise AssertionError("no value found")


SHAPE = Shape(opened_share=0.24, extra_event_share=0.31)
OPENING = _value_in_bucket(0, 2400)
TWO_EVENTS = _value_in_bucket(2400, 5500)
ONE_EVENT = _value_in_bucket(5500, BUCKETS)


@pytest.mark.parametrize(
    ("stage", "topic", "value", "outputs"),
    [
        ("ingest", INBOUND, ONE_EVENT, (RECEIVED,)),
        ("conversation_state", RECEIVED, OPENING, (EVENTS, COMMANDS)),
        ("conversation_state", RECEIVED, TWO_EVENTS, (EVENTS, EVENTS)),
        ("conversation_state", RECEIVED, ONE_EVENT, (EVENTS,)),
        ("conversation_state", DECISIONS, OPENING, (EVENTS,)),
        ("team_routing", COMMANDS, OPENING, (DECISIONS,)),
        ("timeout_sweeper", EVENTS, OPENING, ()),
        ("metrics", EVENTS, TWO_EVENTS, ()),
    ],
)
def test_each_stand_in_writes_what_its_service_would_for_a_record(stage: str, topic: str, value: bytes, outputs: tuple[str, ...]) -> None:
    assert SHAPE.outputs(stage, topic, value) == outputs


def test_the_expected_counts_follow_the_records_own_buckets() -> None:
    bodies = [OPENING, OPENING, TWO_EVENTS, ONE_EVENT]
    expected = SHAPE.expected(bodies)
    assert expected["written"] == {INBOUND: 4, RECEIVED: 4, COMMANDS: 2, DECISIONS: 2, EVENTS: 2 + 2 + 1 + 2}
    # Every stage reads every record of its topics: conversation-state the received ones and
    # the decisions; the sweeper and metrics every event.
    assert expected["read"] == {"ingest": 4, "conversation_state": 6, "team_routing": 2, "timeout_sweeper": 7, "metrics": 7}
    assert set(expected["read"]) == set(STAGES)


def test_on_the_benchmarks_messages_the_records_follow_the_shapes_shares() -> None:
    plan = plan_messages(make_population(2_000, 4, 7), rate=20_000, duration=1.0, seed=7, tag="t")
    n = len(plan.bodies)
    written = SHAPE.expected(plan.bodies)["written"]
    assert written[COMMANDS] / n == pytest.approx(0.24, abs=0.015)
    assert written[EVENTS] / n == pytest.approx(1.55, abs=0.02)
    assert Shape(opened_share=0.0, extra_event_share=0.0).expected(plan.bodies)["written"][EVENTS] == n


def _result(steps: list[tuple[float, bool, float, float]], top: float | None) -> dict:
    """A bench.pipeline result: (rate, bounded, commands per message, events per message) per step."""
    return {
        "summary": {"highest_bounded_rate": top},
        "steps": [
            {"rate": r, "bounded": b, "per_message": {"records_produced": {"messages.received.v1": 1.0, COMMANDS: c, EVENTS: e}}}
            for r, b, c, e in steps
        ],
    }


@pytest.mark.parametrize(
    ("result", "shape"),
    [
        # the step at the highest bounded rate, wherever it ran in the sweep
        (_result([(2000, True, 0.05, 1.12), (4000, False, 0.03, 1.05), (2500, True, 0.045, 1.11)], 2500), Shape(0.045, 0.065)),
        (_result([(2000, True, 0.24, 1.55), (2500, False, 0.2, 1.4)], 2000), Shape(0.24, 0.31)),
        # nothing bounded: the last step
        (_result([(100, False, 0.1, 1.3), (200, False, 0.05, 1.2)], None), Shape(0.05, 0.15)),
        # fewer events than received records and commands account for: no second events
        (_result([(100, True, 0.1, 1.0)], 100), Shape(0.1, 0.0)),
    ],
)
def test_the_shape_of_a_pipeline_run_is_its_highest_bounded_steps(result: dict, shape: Shape) -> None:
    got = Shape.from_pipeline_result(result)
    assert got.opened_share == pytest.approx(shape.opened_share)
    assert got.extra_event_share == pytest.approx(shape.extra_event_share)


def test_a_pipeline_result_without_steps_has_no_shape() -> None:
    with pytest.raises(ValueError, match="no step"):
        Shape.from_pipeline_result({"summary": {}, "steps": [{"rate": 5, "per_message": {}}]})
