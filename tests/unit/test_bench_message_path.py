"""The pipeline benchmark checks the message path's promises at every rate: each message added
to its transcript once, in its customer's order, and each customer's conversation events in
sequence (``message_path_audit``, ``Collector.take``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench.pipeline import Collector, audit_faults, lag_caught_up, message_path_audit, message_path_faults, stored_lines_fault, summary_lines
from shared.contracts.conversations import ConversationOpened, MessageAdded
from shared.contracts.envelope import Envelope

EXAMPLES = Path(__file__).resolve().parents[2] / "shared/contracts/examples/v1"
EVENTS = "x.conversations.events.v1"


@pytest.mark.parametrize(
    ("added_at", "added_again", "caught_up", "expected"),
    [
        # a: m1, m3 in partition 0; b: m2, m4 in partition 1; each customer's in send order
        ({"m1": (0, 10), "m2": (1, 5), "m3": (0, 11), "m4": (1, 9)}, {}, True, {}),
        # the other customer's messages in between do not matter, only each one's own order
        ({"m1": (0, 12), "m2": (0, 10), "m3": (0, 13), "m4": (0, 11)}, {}, True, {}),
        # a's second message added before its first
        ({"m1": (0, 11), "m2": (1, 5), "m3": (0, 10), "m4": (1, 9)}, {}, True, {"out_of_order": 1}),
        # a's messages in two partitions: no order between them
        ({"m1": (0, 10), "m2": (1, 5), "m3": (2, 11), "m4": (1, 9)}, {}, True, {"out_of_order": 1}),
        # m4 never added: lost once every group caught up, else the step did not finish
        ({"m1": (0, 10), "m2": (1, 5), "m3": (0, 11)}, {}, True, {"lost": 1}),
        ({"m1": (0, 10), "m2": (1, 5), "m3": (0, 11)}, {}, False, {"unfinished": 1}),
        # m2 added again under another event id
        ({"m1": (0, 10), "m2": (1, 5), "m3": (0, 11), "m4": (1, 9)}, {"m2": 1, "other": 2}, True, {"added_twice": 1}),
    ],
)
def test_a_steps_messages_are_audited_for_loss_doubles_and_order(
    added_at: dict[str, tuple[int, int]], added_again: dict[str, int], caught_up: bool, expected: dict[str, int]
) -> None:
    audit = message_path_audit(["m1", "m2", "m3", "m4"], ["a", "b", "a", "b"], added_at, added_again, caught_up)  # type: ignore[list-item]
    zero = {"lost": 0, "unfinished": 0, "added_twice": 0, "out_of_order": 0}
    assert audit == {"messages": 4, **zero, **expected}


def _event(payload: type[Any], event_id: str, sequence: int, **data: Any) -> bytes:
    example = Envelope[payload].model_validate_json((EXAMPLES / f"{payload.__name__}.json").read_bytes())  # type: ignore[valid-type]
    envelope = example.model_copy(update={"id": event_id, "sequence": sequence, "data": example.data.model_copy(update=data)})
    return envelope.model_dump_json().encode()  # as the outbox sends it


def _take(c: Collector, value: bytes, offset: int, key: bytes = b"cus_1", partition: int = 0) -> None:
    c.take(EVENTS, SimpleNamespace(key=key, value=value, timestamp=1_000_000 + offset, partition=partition, offset=offset))


def test_the_collector_follows_each_customers_event_sequence() -> None:
    c = Collector("127.0.0.1:9", "x.")
    _take(c, _event(ConversationOpened, "e1", 7), 0)  # the first seen: any number
    _take(c, _event(MessageAdded, "e2", 8, message_id="m1"), 1)
    _take(c, _event(MessageAdded, "e2", 8, message_id="m1"), 2)  # the same event again: a republished record
    _take(c, _event(MessageAdded, "f1", 3, message_id="m9"), 3, key=b"cus_2", partition=1)  # another customer
    assert c.sequence_counts() == {"events": 3, "republished": 1, "renumbered": 0, "reapplied": 0, "sequence_reused": 0, "sequence_skipped": 0}
    assert c.added_at == {"m1": (0, 1), "m9": (1, 3)}
    assert c.added_again == {}

    _take(c, _event(MessageAdded, "e3", 8, message_id="m1"), 4)  # another event at 8, the same message again
    _take(c, _event(MessageAdded, "e4", 10, message_id="m2"), 5)  # 9 skipped
    assert c.sequence_counts() == {"events": 5, "republished": 1, "renumbered": 0, "reapplied": 0, "sequence_reused": 1, "sequence_skipped": 1}
    assert c.added_again == {"m1": 1}
    assert c.added_at["m1"] == (0, 1)  # where it was first added

    # The same input applied twice: its event has the same (derived) id, under the next number.
    _take(c, _event(MessageAdded, "e4", 11, message_id="m2"), 6)
    _take(c, _event(MessageAdded, "e5", 12, message_id="m3"), 7)  # and the sequence goes on from there
    assert c.sequence_counts() == {"events": 6, "republished": 1, "renumbered": 0, "reapplied": 1, "sequence_reused": 1, "sequence_skipped": 1}
    assert audit_faults({"reapplied": 1}) == ["1 conversation events published again under a later sequence number (their input applied twice)"]

    # A batch that failed after publishing comes again with its records in another order: its
    # events again, under numbers the sequence already passed (consumers drop them by id, but
    # the state applied another order than they hold: a fault since conversation-state
    # journals its outputs first and publishes the journaled ones again). Republished: not one.
    _take(c, _event(MessageAdded, "e5", 11, message_id="m3"), 8)
    _take(c, _event(MessageAdded, "e4", 12, message_id="m2"), 9)
    assert c.sequence_counts() == {"events": 6, "republished": 1, "renumbered": 2, "reapplied": 1, "sequence_reused": 1, "sequence_skipped": 1}
    assert audit_faults({"renumbered": 2, "republished": 1}) == [
        "2 conversation events published again under an earlier sequence number (a failed batch applied again in another order)"
    ]
    assert audit_faults({"republished": 1}) == []


@pytest.mark.parametrize(
    ("samples", "caught_up"),
    [
        ([(99.0, {"a": 0, "b": 0}, {})], True),
        ([(99.0, {"a": 0, "b": 3}, {})], False),
        ([(90.0, {"a": 0, "b": 0}, {})], False),  # no answer from the broker since: not known
        ([(99.0, {"a": 4}, {}), (99.5, {"a": 0}, {})], True),  # the newest counts
        ([], False),
    ],
)
def test_every_group_caught_up_only_by_a_fresh_sample(samples: list[tuple[float, dict[str, int], Any]], caught_up: bool) -> None:
    assert lag_caught_up(samples, now=100.0) is caught_up


def test_a_fault_is_named_in_the_summary_and_a_clean_run_says_what_it_checked() -> None:
    clean = {
        "messages": 10, "lost": 0, "unfinished": 0, "added_twice": 0, "out_of_order": 0,
        "events": 25, "republished": 0, "renumbered": 0, "reapplied": 0, "sequence_reused": 0, "sequence_skipped": 0,
    }
    assert audit_faults(clean) == []
    assert audit_faults({**clean, "unfinished": 3, "republished": 2}) == []  # neither is a fault
    faulty = {**clean, "lost": 1, "sequence_skipped": 2}
    assert audit_faults(faulty) == ["1 lost (never added, every group caught up)", "2 conversation events skipped a sequence number"]

    def result(*audits: dict[str, Any], warmup: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        steps = [{"label": f"r{n}", "rate": float(n), "message_path": a} for n, a in enumerate(audits)]
        return {
            "baseline": {"passthrough_rate": 1.0, "moved": 1, "preload_rate": 1.0},
            "summary": {"highest_bounded_rate": None, "highest_bounded_throughput": 0, "ratio": None, "saturated_ratio": None, "best_throughput": 0.0},
            "warmup": {"label": "warmup", "message_path": warmup} if warmup else {"label": "warmup"},
            "steps": steps,
            "machine": {},
            "peak_rss_kb": {},
            **extra,
        }

    lines = summary_lines(result(clean, clean))
    assert any(line.startswith("message path in all 2 steps: 20 messages, none lost") and "50 conversation events" in line for line in lines)
    between = {**clean, "messages": 0, "events": 7}
    lines = summary_lines(result(clean, clean, warmup=clean, events_between_steps=between))
    assert any(line.startswith("message path in the warm-up and 2 steps: 30 messages") and "82 conversation events" in line for line in lines)
    assert message_path_faults(result(clean, clean, warmup=clean, events_between_steps=between)) == []

    lines = summary_lines(result(clean, faulty))
    assert "r1: MESSAGE PATH FAULT: 1 lost (never added, every group caught up); 2 conversation events skipped a sequence number" in lines
    assert not any(line.startswith("message path in") for line in lines)
    # the warm-up's faults, the events between steps and the stored lines count as well
    faults = message_path_faults(
        result(
            clean,
            warmup={**clean, "out_of_order": 1},
            events_between_steps={**between, "sequence_reused": 1},
            stored_lines={"messages": 30, "failed_sends": 0, "stored": 31, "caught_up": True},
        )
    )
    assert faults == [
        "warmup: MESSAGE PATH FAULT: 1 added out of their customer's order",
        "between steps: MESSAGE PATH FAULT: 1 conversation events reused a sequence number",
        "MESSAGE PATH FAULT: 31 transcript lines stored for 30 messages sent",
    ]


@pytest.mark.parametrize(
    ("lines", "fault"),
    [
        ({"messages": 1000, "stored": 1000, "caught_up": True}, None),
        ({"messages": 1000, "stored": 998, "caught_up": True}, "998 transcript lines stored for 1,000 messages sent"),
        ({"messages": 1000, "stored": 1001, "caught_up": True}, "1,001 transcript lines stored for 1,000 messages sent"),
        ({"messages": 1000, "stored": 998, "caught_up": False}, None),  # lines may still be on their way
        # two sends reported failed: either may have landed all the same (a timeout)
        ({"messages": 1000, "failed_sends": 2, "stored": 1002, "caught_up": True}, None),
        ({"messages": 1000, "failed_sends": 2, "stored": 1003, "caught_up": True}, "1,003 transcript lines stored for 1,000 messages sent"),
        (None, None),  # a run from before the check
    ],
)
def test_the_lines_stored_at_the_end_match_the_messages_sent(lines: dict[str, Any] | None, fault: str | None) -> None:
    assert stored_lines_fault(lines) == fault


class GrowingCount:
    """A collection whose line count grows by ``step`` each time it is asked."""

    def __init__(self, start: int, step: int) -> None:
        self.count, self.step, self.asked = start, step, 0

    async def estimated_document_count(self) -> int:
        self.asked += 1
        value = self.count
        self.count += self.step
        return value


async def test_the_stored_lines_are_counted_once_the_write_behind_stored_them() -> None:
    from bench.pipeline import stored_line_count

    lines = GrowingCount(start=8, step=1)
    assert await stored_line_count(lines, expected=10, timeout_s=5) == 10
    assert lines.asked == 3


async def test_more_lines_than_messages_are_answered_at_once_and_too_few_after_the_timeout() -> None:
    from bench.pipeline import stored_line_count

    doubled = GrowingCount(start=12, step=0)
    assert await stored_line_count(doubled, expected=10, timeout_s=5) == 12
    assert doubled.asked == 1
    short = GrowingCount(start=9, step=0)
    assert await stored_line_count(short, expected=10, timeout_s=0.6) == 9
    assert short.asked >= 2
