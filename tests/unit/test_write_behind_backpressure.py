"""conversation-state's write-behind holds a bounded backlog: once more than ``max_unstored``
customers have changes not yet written to their collections, or are in the write in flight
(the store is slower than the input), the batch that crossed the limit waits for the write in
flight and starts the next, until within the limit, so the backlog stays in Kafka and the
process's memory stays bounded. A failed write is retried after a pause while waiting."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from services.conversation_state.lifecycle import CustomerRecords
from services.conversation_state.model import Customer
from services.conversation_state.write_behind import JournaledCustomers
from shared.runtime.checkpoints import CheckpointMetrics
from tests.support import ManualClock

NOW = datetime(2026, 12, 5, 9, tzinfo=UTC)


class Journal:
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    async def insert_many(self, docs: list[dict[str, Any]]) -> None:
        self.entries.extend(docs)

    async def bulk_write(self, ops: list[Any], ordered: bool = True) -> None:
        return None


class SlowStore:
    """A store whose writes finish only when the test lets them (``gate``), and can fail."""

    def __init__(self) -> None:
        self.journal = Journal()
        self.gate = asyncio.Event()
        self.failures = 0  # writes still to fail
        self.written: list[set[str]] = []

    async def write_changes(self, changes: Any, journaled: Any = (), mark: bool = True) -> None:
        await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise ConnectionError("store unreachable")
        self.written.append({doc["_id"] for doc, _ in changes.customers})


def batch(*customer_ids: str) -> dict[str, CustomerRecords]:
    return {
        cid: CustomerRecords(customer=Customer(id=cid, home_team_id="pnw", home_team_source="area_code", created_at=NOW))
        for cid in customer_ids
    }


async def journaled(memory: JournaledCustomers, *customer_ids: str) -> None:
    records = batch(*customer_ids)
    await memory.append(records, {cid: 0 for cid in customer_ids})


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


async def test_within_the_limit_a_batch_does_not_wait(registry) -> None:
    store = SlowStore()
    memory = JournaledCustomers(store, interval_s=60, metrics=CheckpointMetrics(registry, "conversations", backpressure=True), max_unstored=3)  # type: ignore[arg-type]
    await journaled(memory, "cus_1", "cus_2", "cus_3")
    await asyncio.wait_for(memory.catch_up(), timeout=1)  # three unstored: at the limit, no write started
    assert memory.writing is None and len(memory.dirty) == 3
    assert registry.get_sample_value("hometeam_state_backpressure_seconds_total", {"state": "conversations"}) == 0


async def test_over_the_limit_a_write_starts_and_the_batch_waits_until_it_lands(registry) -> None:
    """The customers of the write in flight are not stored yet either: they count against the
    limit until it lands (what the process holds is bounded by the limit, not twice it)."""
    store = SlowStore()
    memory = JournaledCustomers(store, interval_s=60, metrics=CheckpointMetrics(registry, "conversations", backpressure=True), max_unstored=3)  # type: ignore[arg-type]
    await journaled(memory, "cus_1", "cus_2", "cus_3", "cus_4")
    waiting = asyncio.create_task(memory.catch_up())
    await asyncio.sleep(0.05)
    assert memory.writing is not None and not memory.writing.done()  # everything unstored is being written ...
    assert memory.dirty == {} and memory.unstored == 4
    assert not waiting.done()  # ... and the batch waits for it
    assert registry.get_sample_value("hometeam_state_unstored_records", {"state": "conversations"}) == 4
    store.gate.set()
    await asyncio.wait_for(waiting, timeout=1)
    assert store.written == [{"cus_1", "cus_2", "cus_3", "cus_4"}]
    assert memory.unstored == 0
    assert registry.get_sample_value("hometeam_state_unstored_records", {"state": "conversations"}) == 0


async def test_a_failed_write_is_retried_after_a_pause_while_the_batch_waits(registry) -> None:
    store = SlowStore()
    store.failures = 1
    memory = JournaledCustomers(store, interval_s=60, metrics=CheckpointMetrics(registry, "conversations", backpressure=True), max_unstored=1)  # type: ignore[arg-type]
    await journaled(memory, "cus_1")
    memory.flush()  # in flight; it will fail
    await journaled(memory, "cus_2", "cus_3")  # over the limit meanwhile
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiting = asyncio.create_task(memory.catch_up(retry_after_s=0.05))
    await asyncio.sleep(0.02)
    assert not waiting.done()  # the write in flight holds the batch
    store.gate.set()
    await asyncio.wait_for(waiting, timeout=2)
    assert loop.time() - started >= 0.05  # the failure was followed by a pause, not a busy retry
    await memory.settle()
    assert store.written == [{"cus_1", "cus_2", "cus_3"}]  # the retry took the failed write's customers too
    assert memory.dirty == {} and memory.write_failed is False
    assert registry.get_sample_value("hometeam_state_store_failures_total", {"state": "conversations"}) == 1
    assert registry.get_sample_value("hometeam_state_backpressure_seconds_total", {"state": "conversations"}) > 0


async def test_a_write_already_in_flight_is_waited_for_then_the_rest_is_stored(registry) -> None:
    store = SlowStore()
    memory = JournaledCustomers(store, interval_s=60, metrics=CheckpointMetrics(registry, "conversations", backpressure=True), max_unstored=2)  # type: ignore[arg-type]
    await journaled(memory, "cus_1")
    memory.flush()  # the aged customers' write, still in flight ...
    await journaled(memory, "cus_2", "cus_3", "cus_4")  # ... while the next batch crosses the limit
    waiting = asyncio.create_task(memory.catch_up())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    store.gate.set()
    await asyncio.wait_for(waiting, timeout=1)
    assert store.written == [{"cus_1"}, {"cus_2", "cus_3", "cus_4"}]  # then the rest, and that was waited for too
    assert memory.unstored == 0


async def test_the_customers_whose_changes_have_aged_are_stored_first(registry) -> None:
    """Over the limit, a write of the aged customers that brings the backlog within it is
    enough: the ones changed a moment ago (whose routing decision is about to follow) wait
    for their own interval, so a customer is not written twice for one message."""
    store = SlowStore()
    store.gate.set()
    now = [0.0]
    memory = JournaledCustomers(
        store, interval_s=1.0, metrics=CheckpointMetrics(registry, "conversations", backpressure=True), clock=lambda: now[0], max_unstored=2  # type: ignore[arg-type]
    )
    await journaled(memory, "cus_1", "cus_2")
    now[0] = 1.5
    await journaled(memory, "cus_3", "cus_4")
    await asyncio.wait_for(memory.catch_up(), timeout=1)
    await memory.settle()
    assert store.written == [{"cus_1", "cus_2"}]
    assert set(memory.dirty) == {"cus_3", "cus_4"}


class SlowLines(SlowStore):
    """Also stores transcript lines, once the test lets it (``lines_gate``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines_gate = asyncio.Event()
        self.lines: list[str] = []

    async def save_line_docs(self, docs: list[Any]) -> None:
        await self.lines_gate.wait()
        self.lines += [d["_id"] for d in docs]


def line(n: int) -> dict[str, Any]:
    return {"_id": f"conv_1|{n}", "conversation_id": "conv_1", "customer_id": "cus_1", "seq": n, "text": f"line {n}", "at": NOW, "gen": 1}


async def test_more_lines_than_the_limit_waiting_for_the_line_writer_hold_the_batch(registry) -> None:
    """Lines go to a line writer of their own, one insert at a time; while the store is slow
    they wait in memory, and more of them than ``max_unstored`` hold the batch like unstored
    customers do."""
    store = SlowLines()
    store.gate.set()
    memory = JournaledCustomers(store, interval_s=60, metrics=CheckpointMetrics(registry, "conversations", backpressure=True), max_unstored=3)  # type: ignore[arg-type]
    await journaled(memory, "cus_1")
    memory.finish({}, [line(1)])  # a line write starts (and waits for the store)
    memory.finish({}, [line(2), line(3)])  # behind it
    await asyncio.wait_for(memory.catch_up(), timeout=1)  # three lines: at the limit
    memory.finish({}, [line(4)])
    waiting = asyncio.ensure_future(memory.catch_up())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    store.lines_gate.set()
    await asyncio.wait_for(waiting, timeout=1)
    await memory.settle()
    assert store.lines == [f"conv_1|{n}" for n in range(1, 5)] and memory.unstored_lines == {}


class Deletes(Journal):
    def __init__(self) -> None:
        super().__init__()
        self.deleted = 0

    async def bulk_write(self, ops: list[Any], ordered: bool = True) -> None:
        self.deleted += len(ops)




async def test_an_aged_write_leaves_the_entries_whose_lines_are_not_stored_yet_to_the_next() -> None:
    """A write of aged customers does not wait for the line writer (it would hold the next
    write back): the entries whose lines are not stored yet stay for the next write."""
    store, clock = SlowLines(), ManualClock()
    store.journal = Deletes()
    store.gate.set()
    memory = JournaledCustomers(store, interval_s=1, clock=clock)  # type: ignore[arg-type]
    await journaled(memory, "cus_1")
    memory.finish({}, [line(1)])
    clock.now = 5.0
    memory.store_aged()
    await asyncio.wait_for(memory.writing, timeout=1)  # (not waiting for the line)
    assert store.written == [{"cus_1"}] and store.journal.deleted == 0
    store.lines_gate.set()
    await memory.settle()
    assert store.lines == ["conv_1|1"] and store.journal.deleted == 0
    memory.store_aged()  # the next write deletes it
    await memory.settle()
    assert store.journal.deleted == 1


async def test_a_journal_entry_is_deleted_only_once_the_lines_given_before_the_write_are_stored() -> None:
    """A write of everything (before giving partitions up) waits for them."""
    store = SlowLines()
    store.journal = Deletes()
    store.gate.set()
    memory = JournaledCustomers(store, interval_s=60)  # type: ignore[arg-type]
    await journaled(memory, "cus_1")
    memory.finish({}, [line(1)])
    memory.flush()
    await asyncio.sleep(0.05)
    assert store.written == [{"cus_1"}] and memory.writing is not None and not memory.writing.done()
    assert store.journal.deleted == 0  # the customer is stored, its line not yet
    store.lines_gate.set()
    await memory.settle()
    assert store.journal.deleted == 1 and store.lines == ["conv_1|1"]


def test_a_waiting_line_at_a_position_is_kept_as_bson_and_read_back_as_it_was() -> None:
    from bson.raw_bson import RawBSONDocument

    from services.conversation_state.store import line_doc, unstored_line

    doc = {**line(1), "at": datetime(2026, 12, 5, 9, 0, 0, 123000, tzinfo=UTC)}
    kept = unstored_line(doc)
    assert isinstance(kept, RawBSONDocument)
    assert line_doc(kept) == doc and line_doc(kept)["at"].tzinfo is not None
    legacy = {**doc, "_id": "msg-1", "seq": None}
    assert unstored_line(legacy) is legacy  # by message id: as it is (found by a query in memory)
