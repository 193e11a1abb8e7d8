"""conversation-state keeps an unstored customer once, as its records: the journal entry a
batch appends is made of them and sent, not kept beside them (a second copy of every
unstored customer's documents was a third of conversation-state's memory when the store
fell behind). The owner's read API makes the documents from the records while the customer
is unstored or being written, and reads the store once the write has landed."""

from __future__ import annotations

import gc
import tracemalloc
from datetime import timedelta
from typing import Any

from services.conversation_state import lifecycle
from services.conversation_state.lifecycle import CustomerRecords, Effects
from services.conversation_state.store import rebuild_stored
from services.conversation_state.write_behind import JournaledCustomers
from tests.unit.test_lifecycle import RULES, T0, decision, message
from tests.unit.test_write_behind_backpressure import SlowStore


class Discarding:
    """A journal that takes entries and keeps none (what the process keeps is measured)."""

    async def insert_many(self, docs: list[dict[str, Any]]) -> None:
        return None

    async def bulk_write(self, ops: list[Any], ordered: bool = True) -> None:
        return None


def routed_customer(n: int) -> CustomerRecords:
    """A customer whose first message opened a conversation that was then routed."""
    cid = f"cus_{n:06d}"
    records = CustomerRecords(customer=None)
    lifecycle.customer_message(records, message(f"p{n}", T0, customer_id=cid), RULES, Effects(f"in{n}"))
    assert records.customer is not None and records.customer.open_conversation_id is not None
    routing = decision(records.customer.open_conversation_id, T0 + timedelta(seconds=1), "sea-ana", decision_id=f"dec-{n}")
    lifecycle.routed(records, routing.model_copy(update={"customer_id": cid}), Effects(f"dec{n}"))
    records.customer.applied = {"customer.messages.v1/0": n, "routing.decisions.v1/0": n}
    return records


async def test_journaling_keeps_no_copy_of_the_customers_documents() -> None:
    store = SlowStore()
    store.journal = Discarding()  # type: ignore[assignment]
    memory = JournaledCustomers(store, interval_s=60, max_unstored=10**6)  # type: ignore[arg-type]
    customers = 2_000
    batch = {r.customer.id: r for r in map(routed_customer, range(customers)) if r.customer is not None}
    gc.collect()
    tracemalloc.start()
    try:
        await memory.append(batch, dict.fromkeys(batch, 0))
        gc.collect()
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(memory.dirty) == customers
    # What the memory keeps per unstored customer besides its records: its place in the
    # cache, the unstored set, its journal entry's set, its conversation's owner. A copy of
    # its documents (customer and conversation) costs more than 2 KB on its own.
    assert kept / customers < 1_000, f"{kept / customers:.0f} bytes kept per journaled customer"


async def test_journaling_a_stored_customer_lets_go_of_its_stored_documents() -> None:
    """A customer read from the store holds its stored documents (what a batch compares with);
    once its change is journaled only a summary of them is kept until its write (ids,
    queried fields, what changed), so journaling frees more than it keeps."""
    store = SlowStore()
    store.journal = Discarding()  # type: ignore[assignment]
    memory = JournaledCustomers(store, interval_s=60, max_unstored=10**6)  # type: ignore[arg-type]
    customers = 2_000
    tracemalloc.start()
    try:
        batch = {r.customer.id: r for r in map(routed_customer, range(customers)) if r.customer is not None}
        for records in batch.values():
            rebuild_stored(records)  # as read from the store
            assert records.customer is not None
            records.customer.applied["customer.messages.v1/0"] += 1  # and changed by the batch
        gc.collect()
        before, _ = tracemalloc.get_traced_memory()
        await memory.append(batch, dict.fromkeys(batch, 0))
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(r.stored == {} and r.summary is not None for r in batch.values())
    # A customer's stored documents (the customer's holding its conversation, and the
    # conversation's) are ~2.5 KB; the summary and the bookkeeping a few hundred bytes.
    freed = (before - after) / customers
    assert freed > 1_000, f"{freed:.0f} bytes freed per journaled customer"


async def test_the_read_api_reads_the_records_until_their_write_lands() -> None:
    store = SlowStore()
    memory = JournaledCustomers(store, interval_s=60)  # type: ignore[arg-type]
    records = routed_customer(1)
    customer = records.customer
    assert customer is not None and customer.open_conversation_id is not None
    conv_id = customer.open_conversation_id
    await memory.append({customer.id: records}, {customer.id: 0})
    assert memory.latest(customer.id) == customer.to_doc()
    assert memory.latest(conv_id) == records.conversations[conv_id].to_doc()  # found without its customer's id
    assert set(memory.conversations_of(customer.id)) == {conv_id}

    memory.flush()  # the write is in flight: the store may not have it yet
    assert memory.latest(conv_id, customer.id) == records.conversations[conv_id].to_doc()
    store.gate.set()
    await memory.settle()
    assert store.written == [{customer.id}]
    assert memory.latest(customer.id) is None and memory.latest(conv_id) is None  # the store is the reference now
    assert memory.conversations_of(customer.id) == {} and memory.owner_of == {}
