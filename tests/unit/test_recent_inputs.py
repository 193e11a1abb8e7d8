"""Which applied inputs a customer remembers, to drop a repeat: the latest 64 whatever their
age, older ones for 15 minutes, never more than 512; kept as 8-byte digests of their ids,
packed, with their times in whole seconds (and read from documents that kept the ids themselves)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.conversation_state.lifecycle import (
    MAX_RECENT_INPUT_IDS,
    RECENT_INPUTS_ALWAYS,
    CustomerRecords,
    already_applied,
    recent_inputs,
    remember_applied,
)
from services.conversation_state.model import (
    INPUT_DIGEST_BYTES,
    Customer,
    holds_digest,
    input_digest,
    pack_seconds,
    unpack_seconds,
)

MIN = 60.0
T = 1_800_000_000.0
NOW = datetime(2026, 12, 5, 13, tzinfo=UTC)


def digests(ids: list[str]) -> bytes:
    return b"".join(input_digest(i) for i in ids)


def history(n: int, every_s: float, end: float = T) -> tuple[list[str], list[float]]:
    """n inputs, one every ``every_s`` seconds, the last at ``end``."""
    return [f"in-{i}" for i in range(n)], [end - (n - 1 - i) * every_s for i in range(n)]


@pytest.mark.parametrize(
    ("n", "every_s", "kept"),
    [
        (0, 1.0, 1),  # the first input
        (10, 1.0, 11),
        (200, 60.0, RECENT_INPUTS_ALWAYS),  # a slow customer: the latest 64 (about an hour here)
        (200, 1.0, 201),  # a busy one: everything of the last 15 minutes
        (1000, 1.0, 901),  # 15 minutes of one a second (900) and the new one
        (1000, 0.1, MAX_RECENT_INPUT_IDS),  # never more than 512
    ],
)
def test_how_many_inputs_are_remembered(n: int, every_s: float, kept: int) -> None:
    ids, times = history(n, every_s)
    kept_digests, kept_times = recent_inputs(digests(ids), pack_seconds(times), input_digest("new"), T + every_s)
    count = min(kept, MAX_RECENT_INPUT_IDS)
    assert len(kept_digests) == count * INPUT_DIGEST_BYTES and len(unpack_seconds(kept_times)) == count
    assert kept_digests[-INPUT_DIGEST_BYTES:] == input_digest("new") and unpack_seconds(kept_times)[-1] == int(T + every_s)
    # the latest, in order, each with its own time (whole seconds)
    assert kept_digests[:-INPUT_DIGEST_BYTES] == digests(ids[len(ids) - count + 1 :])
    assert unpack_seconds(kept_times)[:-1] == [int(t) for t in times[len(times) - count + 1 :]]


def test_ids_remembered_before_times_were_kept_count_as_now() -> None:
    ids = [f"old-{i}" for i in range(300)]
    kept, times = recent_inputs(digests(ids), b"", input_digest("new"), T)
    assert kept == digests([*ids, "new"]) and unpack_seconds(times) == [T] * 301
    # 16 minutes later only the latest 64 are left of them.
    later, _ = recent_inputs(kept, times, input_digest("newer"), T + 16 * MIN)
    assert later == digests([*[*ids, "new"][-(RECENT_INPUTS_ALWAYS - 1) :], "newer"])


def test_a_digest_counts_only_at_a_digest_boundary() -> None:
    packed = digests(["a", "b"])
    assert holds_digest(packed, input_digest("a")) and holds_digest(packed, input_digest("b"))
    straddling = packed[4:12]  # the end of one digest and the start of the next
    assert not holds_digest(packed, straddling)
    assert not holds_digest(packed, input_digest("c")) and not holds_digest(b"", input_digest("a"))


def message(message_id: str):  # type: ignore[no-untyped-def]
    from types import SimpleNamespace

    return SimpleNamespace(message_id=message_id)


def test_a_document_that_kept_the_ids_themselves_is_read_as_digests() -> None:
    """Customers stored before 2026-12-05 hold ``recent_input_ids`` (strings) and
    ``recent_input_times`` (possibly fewer: the earliest ids had none)."""
    doc = {
        "_id": "cus_1", "home_team_id": "pnw", "home_team_source": "area_code", "created_at": NOW,
        "recent_input_ids": ["message_id:m0", "message_id:m1", "decision_id:d1"], "recent_input_times": [T, T + 1],
    }  # fmt: skip
    customer = Customer.from_doc(doc)
    records = CustomerRecords(customer)
    assert already_applied(records, message("m1")) and not already_applied(records, message("m2"))
    remember_applied(records, message("m2"), NOW)
    assert already_applied(records, message("m2")) and already_applied(records, message("m0"))
    # the id without a time counts as of the next input, the others keep theirs
    assert unpack_seconds(customer.recent_input_at) == [NOW.timestamp(), T, T + 1, NOW.timestamp()]
    assert "recent_input_ids" not in customer.to_doc() and Customer.from_doc(customer.to_doc()) == customer


def test_a_returning_customer_held_in_memory_costs_under_1200_bytes() -> None:
    """conversation-state holds up to 40,000 customers (cache and unstored); one who wrote
    before carries 64 recent inputs and up to 50 reply gaps whatever its age. As lists of
    strings and floats that was ~9 KB per customer (485 MB under ``bench.memory``)."""
    import gc
    import tracemalloc

    base = Customer(id="cus_1", home_team_id="pnw", home_team_source="area_code", created_at=NOW)
    records = CustomerRecords(base)
    for i in range(RECENT_INPUTS_ALWAYS):
        remember_applied(records, message(f"0f4c6a1e-1b7e-4d5e-9c1a-{i:012d}"), NOW)
    base.reply_gaps_s = [float(i) for i in range(50)]  # type: ignore[assignment]
    base.applied = {f"messages.received.v1/{i}": 10**7 + i for i in range(5)}
    doc = base.to_doc()
    gc.collect()
    tracemalloc.start()
    try:
        held = [Customer.from_doc(dict(doc, _id=f"cus_{n}")) for n in range(500)]
        gc.collect()
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held[0].recent_inputs == base.recent_inputs and list(held[0].reply_gaps_s) == list(range(50))
    assert size / len(held) < 1_200, f"{size / len(held):.0f} bytes per customer"
