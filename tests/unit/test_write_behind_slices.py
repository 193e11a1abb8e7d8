"""conversation-state's write behind stores its customers ``write_slice`` at a time
(``STATE_WRITE_SLICE``): a slice's documents are made when its turn comes, and only between
batches (never while a batch holds ``applying``, between taking its customers and journaling
them); its customers count as stored as soon as it lands, so a batch held back by
``STATE_MAX_UNSTORED_CUSTOMERS`` goes on once enough has landed, not when the whole write ends;
a slice that fails leaves the slices before it stored and puts itself and the rest back."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry

from services.conversation_state.write_behind import JournaledCustomers
from shared.runtime.checkpoints import CheckpointMetrics
from tests.unit.test_write_behind_backpressure import Journal, journaled


class SteppedStore:
    """A store whose writes each wait for the test to let one through (``step``), and can fail;
    it notes, for every write, which customers it carries and which customers' documents had
    been made by then (``stored`` whole, ``summary`` gone)."""

    def __init__(self) -> None:
        self.journal = Journal()
        self.steps = asyncio.Semaphore(0)
        self.fail_at: set[int] = set()  # writes (0-based) that fail
        self.written: list[list[str]] = []
        self.made_when_written: list[set[str]] = []
        self.memory: JournaledCustomers | None = None
        self.calls = 0

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.steps.release()

    async def write_changes(self, changes: Any, journaled: Any = (), mark: bool = True) -> None:
        call = self.calls
        self.calls += 1
        assert self.memory is not None
        self.made_when_written.append({cid for cid, r in self.memory.records.items() if r.summary is None})
        await self.steps.acquire()
        if call in self.fail_at:
            raise ConnectionError("store unreachable")
        self.written.append(sorted(doc["_id"] for doc, _ in changes.customers))


CUSTOMERS = ("cus_1", "cus_2", "cus_3", "cus_4", "cus_5")


async def five_journaled(max_unstored: int = 100) -> tuple[CollectorRegistry, SteppedStore, JournaledCustomers]:
    """A memory on a ``SteppedStore`` with ``CUSTOMERS`` journaled, none stored."""
    registry = CollectorRegistry()
    store = SteppedStore()
    memory = JournaledCustomers(store, interval_s=60, metrics=CheckpointMetrics(registry, "conversations", backpressure=True), max_unstored=max_unstored, write_slice=2)  # type: ignore[arg-type]
    store.memory = memory
    await journaled(memory, *CUSTOMERS)
    return registry, store, memory


async def until(condition: Any, timeout: float = 1.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)



async def test_a_write_goes_a_slice_at_a_time_and_its_customers_count_as_stored_as_each_lands() -> None:
    registry, store, memory = await five_journaled()
    memory.flush()
    await until(lambda: store.calls == 1)
    # The first slice's documents are made; the others' are not yet (only their summaries).
    assert store.made_when_written[0] == {"cus_1", "cus_2"}
    assert memory.unstored == 5
    store.step()
    await until(lambda: store.calls == 2)
    assert store.written == [["cus_1", "cus_2"]]
    assert memory.unstored == 3 and memory.writing_customers == {"cus_3", "cus_4", "cus_5"}
    assert registry.get_sample_value("hometeam_state_unstored_records", {"state": "conversations"}) == 3
    assert {"cus_1", "cus_2"} <= memory.settled
    store.step(2)
    await memory.settle()
    assert store.written == [["cus_1", "cus_2"], ["cus_3", "cus_4"], ["cus_5"]]
    assert memory.unstored == 0 and not memory.write_failed


async def test_a_slice_is_made_only_between_batches() -> None:
    """While a batch holds ``applying`` (its customers taken, not journaled yet), the write
    makes no documents: it would store changes whose outputs may not be out."""
    registry, store, memory = await five_journaled()
    async with memory.applying:
        memory.flush()
        await asyncio.sleep(0.02)
        assert store.calls == 0  # waiting for the batch
        assert all(r.summary is not None for r in memory.records.values())
    await until(lambda: store.calls == 1)
    store.step()
    async with memory.applying:  # a batch between the first slice and the second
        await asyncio.sleep(0.02)
        assert store.calls == 1
    store.step(2)
    await memory.settle()
    assert len(store.written) == 3


async def test_a_batch_held_back_goes_on_once_enough_has_landed() -> None:
    registry, store, memory = await five_journaled(3)
    waiting = asyncio.create_task(memory.catch_up())  # 5 unstored, limit 3: a write starts
    await until(lambda: store.calls == 1)
    assert not waiting.done()
    store.step()  # cus_1, cus_2 land: 3 unstored, within the limit
    await asyncio.wait_for(waiting, timeout=1)
    assert not memory.writing.done()  # the rest of the write is still in flight
    assert memory.unstored == 3
    store.step(2)
    await memory.settle()
    assert memory.unstored == 0


async def test_a_failed_slice_leaves_the_ones_before_it_stored_and_puts_back_the_rest() -> None:
    registry, store, memory = await five_journaled()
    store.fail_at = {1}
    entry = next(iter(memory.entries))
    memory.flush()
    store.step(2)
    await memory.settle()
    assert store.written == [["cus_1", "cus_2"]]
    assert memory.write_failed
    assert set(memory.dirty) == {"cus_3", "cus_4", "cus_5"} and memory.writing_customers == set()
    assert memory.entries == {entry: {"cus_3", "cus_4", "cus_5"}}  # the journal entry stays for what is not stored
    failed = [memory.records[c] for c in ("cus_3", "cus_4")]
    assert all(r.stored == {} and r.summary is None for r in failed)  # written in full next time
    assert memory.records["cus_5"].summary is not None  # never made: as it was
    assert registry.get_sample_value("hometeam_state_store_failures_total", {"state": "conversations"}) == 1
    store.step(2)
    memory.flush()
    await memory.settle()
    assert store.written[1:] == [["cus_3", "cus_4"], ["cus_5"]]
    assert memory.unstored == 0 and memory.entries == {} and not memory.write_failed


async def test_a_write_stops_when_the_memory_is_dropped() -> None:
    registry, store, memory = await five_journaled()
    memory.flush()
    await until(lambda: store.calls == 1)
    memory.drop()  # a rebalance: the journal keeps what was not stored
    store.step(3)
    await memory.settle()
    assert store.calls == 1  # the slice under way landed; no further slice was made
    assert memory.unstored == 0 and memory.records == {}


async def test_stored_customers_beyond_the_cache_leave_as_each_slice_lands() -> None:
    """The batches a landed slice lets go on bring other customers in: the stored ones beyond
    ``max_clean`` leave then, not when the whole write has landed."""
    _, store, memory = await five_journaled()
    memory.max_clean = 2
    memory.flush()
    store.step()
    await until(lambda: store.calls == 2)
    assert set(memory.records) == {"cus_3", "cus_4", "cus_5"}  # cus_1, cus_2 stored and let go; the rest in the write
    store.step(2)
    await memory.settle()


async def test_a_customer_changed_again_while_its_slice_is_pending_counts_once() -> None:
    registry, store, memory = await five_journaled()
    memory.flush()
    await until(lambda: store.calls == 1)  # the first slice (cus_1, cus_2) is on its way
    await journaled(memory, "cus_1", "cus_4")  # a batch changes one customer of it and one of a later slice
    assert memory.unstored == 5  # each customer once, not cus_1 and cus_4 twice
    store.step()
    await until(lambda: store.calls == 2)
    # cus_2 is stored; cus_1 stays dirty (stored by a later write) and cus_3..5 are in flight.
    assert memory.unstored == 4 and "cus_1" in memory.dirty
    assert registry.get_sample_value("hometeam_state_unstored_records", {"state": "conversations"}) == 4
    store.step(2)
    await until(lambda: memory.writing is not None and memory.writing.done())
    assert memory.unstored == 2 and set(memory.dirty) == {"cus_1", "cus_4"}
