"""conversation-state's customers and conversations are written behind a journal, against the
real store: a batch appends one journal entry and rewrites nothing; a flush writes each
changed document once and deletes the entries it covers; after a crash the next owner
overlays what the journal holds (and only what is newer than the store); a failed write
keeps everything for the next attempt."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from shared.contracts.common import Channel, ConversationStatus, Direction
from shared.runtime.compact import compact_document, expand_document

from services.conversation_state.lifecycle import CustomerRecords
from services.conversation_state.model import Conversation, Customer, Line
from services.conversation_state.store import CONVERSATION_QUERY_FIELDS, ConversationStore
from shared.runtime.store import _point_reads, delete_then_insert_is_cheaper
from services.conversation_state.write_behind import JournaledCustomers
from tests.support import StoreWrites

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 23, 9, tzinfo=UTC)


def opened(customer_id: str, conv_id: str) -> CustomerRecords:
    """What a customer's first message leaves: the customer and a waiting conversation."""
    customer = Customer(id=customer_id, home_team_id="pnw", home_team_source="area_code", created_at=NOW)
    customer.open_conversation_id = customer.last_conversation_id = conv_id
    customer.applied["messages/0"] = 1
    conv = Conversation(
        id=conv_id, customer_id=customer_id, home_team_id="pnw", status=ConversationStatus.WAITING_ON_AGENT,
        opened_at=NOW, updated_at=NOW, last_channel=Channel.SMS,
    )  # fmt: skip
    return CustomerRecords(customer=customer, conversations={conv_id: conv})


def routed(records: CustomerRecords, agent: str) -> None:
    """What the routing decision changes a moment later."""
    assert records.customer is not None and records.customer.open_conversation_id is not None
    conv = records.conversations[records.customer.open_conversation_id]
    conv.agent_id, conv.assigned_at = agent, NOW + timedelta(seconds=1)
    records.customer.applied["decisions/0"] = 7


@pytest.fixture
async def store(infra, mongo_db_name):
    writes = StoreWrites()
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True, event_listeners=[writes])
    try:
        yield ConversationStore(client[mongo_db_name]), writes
    finally:
        await client.close()


async def flushed(memory: JournaledCustomers) -> None:
    memory.flush()
    await memory.settle()


async def first_slice_made() -> None:
    """Let a write just started make its first slice's documents (its task runs until its
    first store command, which the tests below hold back)."""
    await asyncio.sleep(0)


async def stored(store: ConversationStore, collection: str, doc_id: str) -> dict[str, Any] | None:
    return await getattr(store, collection).find_one({"_id": doc_id})


async def test_two_batches_then_a_flush_write_each_document_once(store) -> None:
    store, writes = store
    memory = JournaledCustomers(store, interval_s=60)
    records = opened("cus_1", "conv_1")
    await memory.append({"cus_1": records}, {"cus_1": 0})
    routed(records, "ana")
    await memory.append({"cus_1": records}, {"cus_1": 0})
    assert writes.of("customers") == [] and writes.of("conversations") == []
    assert len(writes.of("conversation_journal")) == 2  # one entry per batch

    await flushed(memory)
    assert writes.of("customers") == [("insert", "cus_1")]  # new: inserted once, never replaced
    assert writes.of("conversations") == [("insert", "conv_1")]
    assert (await stored(store, "conversations", "conv_1"))["agent_id"] == "ana"
    assert await store.journal.count_documents({}) == 0  # the entries it covered are gone

    await memory.append({"cus_1": records}, {"cus_1": 0})  # nothing changed: nothing journaled
    assert len([op for op in writes.of("conversation_journal") if op[0] == "insert"]) == 2


async def test_after_a_crash_the_next_owner_recovers_what_was_not_stored(store) -> None:
    store, _ = store
    before = JournaledCustomers(store, interval_s=60)
    first = opened("cus_1", "conv_1")
    await before.append({"cus_1": first}, {"cus_1": 0})
    await flushed(before)  # stored with the customer's first message
    routed(first, "ana")
    await before.append({"cus_1": first}, {"cus_1": 0})  # journaled only ...
    other = opened("cus_9", "conv_9")
    await before.append({"cus_9": other}, {"cus_9": 3})  # ... as is a customer of another partition
    # kill -9: the memory is gone, the journal is not.

    after = JournaledCustomers(store, interval_s=60)
    await after.recover([0])
    recovered = after.take(["cus_1"])["cus_1"]
    assert recovered.conversations["conv_1"].agent_id == "ana"
    assert recovered.customer is not None and recovered.customer.applied == {"messages/0": 1, "decisions/0": 7}
    assert after.take(["cus_9"]) == {}  # not this owner's partition
    await flushed(after)
    assert (await stored(store, "conversations", "conv_1"))["agent_id"] == "ana"
    assert await store.journal.count_documents({"p": 0}) == 0
    assert await store.journal.count_documents({"p": 3}) == 1  # left for that partition's owner


async def test_entries_older_than_the_stored_document_are_not_overlaid(store) -> None:
    store, _ = store
    memory = JournaledCustomers(store, interval_s=60)
    records = opened("cus_1", "conv_1")
    await memory.append({"cus_1": records}, {"cus_1": 0})
    entries = [d async for d in store.journal.find({})]
    routed(records, "ana")
    await memory.append({"cus_1": records}, {"cus_1": 0})
    await flushed(memory)
    # A crash after storing but before the entries were deleted: put the first one back.
    await store.journal.insert_many(entries)

    after = JournaledCustomers(store, interval_s=60)
    await after.recover([0])
    assert after.take(["cus_1"]) == {}  # the store is newer: read from there when needed
    await flushed(after)
    assert await store.journal.count_documents({}) == 0
    assert (await stored(store, "conversations", "conv_1"))["agent_id"] == "ana"


async def test_a_failed_write_keeps_the_state_and_the_journal_for_the_next_one(store, monkeypatch) -> None:
    store, _ = store
    memory = JournaledCustomers(store, interval_s=60, max_clean=0)
    await memory.append({"cus_1": opened("cus_1", "conv_1")}, {"cus_1": 0})

    async def down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("store unreachable")

    monkeypatch.setattr(store.conversations, "insert_many", down)
    await flushed(memory)
    monkeypatch.undo()
    assert await store.journal.count_documents({}) == 1
    assert memory.take(["cus_1"]) != {}  # still in memory (max_clean=0 evicts only stored ones)

    await flushed(memory)
    assert (await stored(store, "customers", "cus_1")) is not None
    assert await store.journal.count_documents({}) == 0
    await flushed(memory)
    assert memory.take(["cus_1"]) == {}  # stored now: evicted


async def stored_then_routed(store: ConversationStore) -> tuple[JournaledCustomers, CustomerRecords]:
    """cus_1's first message stored, then the routing decision journaled, not stored yet."""
    memory = JournaledCustomers(store, interval_s=60)
    records = opened("cus_1", "conv_1")
    await memory.append({"cus_1": records}, {"cus_1": 0})
    await flushed(memory)
    routed(records, "ana")
    await memory.append({"cus_1": records}, {"cus_1": 0})
    return memory, records


async def test_the_read_api_of_the_owner_shows_what_is_not_stored_yet(store, tmp_path) -> None:
    import httpx
    from starlette.applications import Starlette

    from services.conversation_state.read_api import read_routes
    from shared.teams import DirectoryWatcher

    store, _ = store
    memory, records = await stored_then_routed(store)  # the decision journaled, not stored yet
    fresh = opened("cus_2", "conv_2")
    await memory.append({"cus_2": fresh}, {"cus_2": 0})  # never stored at all
    assert (await stored(store, "conversations", "conv_1"))["agent_id"] is None

    app = Starlette(routes=read_routes(store, DirectoryWatcher(Path("deploy/teams.yaml")), None, memory))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        assert (await http.get("/conversations/conv_1")).json()["agent_id"] == "ana"
        view = (await http.get("/customers/cus_1/conversation")).json()
        assert view["current"]["agent_id"] == "ana"
        assert (await http.get("/customers/cus_2/conversation")).json()["current"]["conversation_id"] == "conv_2"
        assert (await http.get("/conversations/conv_2")).status_code == 200
        # Another replica (no memory of these customers) answers from the store.
        other = Starlette(routes=read_routes(store, DirectoryWatcher(Path("deploy/teams.yaml")), None, None))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other), base_url="http://test") as elsewhere:
            assert (await elsewhere.get("/conversations/conv_1")).json()["agent_id"] is None
            assert (await elsewhere.get("/conversations/conv_2")).status_code == 404


@pytest.mark.parametrize("scanning", [True, False], ids=["queries-scan", "indexed"])
async def test_the_owner_lists_earlier_conversations_not_stored_yet(store, scanning) -> None:
    import httpx
    from starlette.applications import Starlette

    from services.conversation_state.read_api import read_routes
    from shared.teams import DirectoryWatcher

    store, _ = store
    _point_reads[id(store.conversations.database.client)] = scanning  # (what buildInfo would tell)
    memory = JournaledCustomers(store, interval_s=60)
    records = opened("cus_1", "conv_1")
    await memory.append({"cus_1": records}, {"cus_1": 0})  # the first conversation, never stored
    second = opened("cus_1", "conv_2")
    second.conversations["conv_1"] = records.conversations["conv_1"]
    second.conversations["conv_1"].status = ConversationStatus.RESOLVED
    second.conversations["conv_2"].opened_at = NOW + timedelta(hours=2)
    second.conversations["conv_2"].previous_conversation_id = "conv_1"
    await memory.append({"cus_1": second}, {"cus_1": 0})

    app = Starlette(routes=read_routes(store, DirectoryWatcher(Path("deploy/teams.yaml")), None, memory))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        view = (await http.get("/customers/cus_1/conversation")).json()
    assert view["current"]["conversation_id"] == "conv_2"
    assert [(c["conversation_id"], c["status"]) for c in view["earlier"]] == [("conv_1", "resolved")]
    assert view["earlier_total"] == 1


def said(conv: str, n: int, customer: str = "cus_1", seq: int | None = None) -> Line:
    """Line ``n`` of a conversation (at ``seq``, or by message id)."""
    return Line(
        message_id=f"{conv}-m{n}", conversation_id=conv, customer_id=customer, direction=Direction.INBOUND,
        channel=Channel.SMS, text=f"{conv} {n}", at=NOW + timedelta(seconds=n), seq=seq,
    )  # fmt: skip


async def customer_with_history(store: ConversationStore, writes: StoreWrites) -> Any:
    """cus_1: conv_0 (stored before lines had positions: by message id, out of time order),
    conv_1 (resolved, MAX_PAGE_SIZE + 1 lines) and the current conv_2, whose stored document
    counts 2 of its 3 lines (written behind); cus_9 with conv_9. Returns a client of the read
    API of another replica (nothing in memory), finds recorded from then on."""
    import httpx
    from starlette.applications import Starlette

    from services.conversation_state.read_api import MAX_PAGE_SIZE, read_routes
    from shared.teams import DirectoryWatcher

    memory = JournaledCustomers(store, interval_s=60)
    records = opened("cus_1", "conv_2")
    for n, conv_id in enumerate(["conv_0", "conv_1"]):
        earlier = opened("cus_1", conv_id).conversations[conv_id]
        earlier.status, earlier.opened_at = ConversationStatus.RESOLVED, NOW - timedelta(hours=2 - n)
        records.conversations[conv_id] = earlier
    records.conversations["conv_0"].line_count = None
    records.conversations["conv_1"].line_count = MAX_PAGE_SIZE + 1
    records.conversations["conv_2"].line_count = 2
    records.conversations["conv_1"].previous_conversation_id = "conv_0"
    records.conversations["conv_2"].previous_conversation_id = "conv_1"
    await memory.append({"cus_1": records, "cus_9": opened("cus_9", "conv_9")}, {"cus_1": 0, "cus_9": 0})
    await flushed(memory)
    await store.save_lines([said("conv_0", n) for n in (3, 1, 2)])
    await store.save_lines([said("conv_1", n, seq=n) for n in range(1, MAX_PAGE_SIZE + 2)])
    await store.save_lines([said("conv_2", n, seq=n) for n in (1, 2, 3)] + [said("conv_9", 1, "cus_9", seq=1)])
    writes.finds.clear()
    writes.find_filters.clear()
    app = Starlette(routes=read_routes(store, DirectoryWatcher(Path("deploy/teams.yaml")), None, None))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.mark.parametrize("scanning", [True, False], ids=["queries-scan", "indexed"])
async def test_a_customers_view_reads_transcripts_by_position(store, scanning) -> None:
    """Each conversation with its own lines, in order, at most a page of them; the current
    one's lines past what its stored document counts too. Lines are read by ``_id`` (the only
    filter the embedded FerretDB serves without scanning every line), but those of a
    conversation stored before lines had positions, by one query, in time order. Where queries
    scan, the earlier conversations are read along their previous ones by ``_id`` too."""
    from services.conversation_state.read_api import MAX_PAGE_SIZE

    store, writes = store
    _point_reads[id(store.messages.database.client)] = scanning  # (what buildInfo would tell)
    async with await customer_with_history(store, writes) as http:
        view = (await http.get("/customers/cus_1/conversation")).json()
    assert [line["text"] for line in view["current"]["transcript"]] == ["conv_2 1", "conv_2 2", "conv_2 3"]
    assert [c["conversation_id"] for c in view["earlier"]] == ["conv_1", "conv_0"]
    assert [line["text"] for line in view["earlier"][0]["transcript"]] == [f"conv_1 {n}" for n in range(1, MAX_PAGE_SIZE + 1)]
    assert [line["text"] for line in view["earlier"][1]["transcript"]] == ["conv_0 1", "conv_0 2", "conv_0 3"]
    assert view["current"]["transcript"][0]["message_id"] == "conv_2-m1"
    assert view["earlier"][1]["transcript"][0]["message_id"] == "conv_0-m1"
    assert writes.queries("messages") == [{"conversation_id": {"$in": ["conv_0"]}}]
    assert view["earlier_total"] == 2
    assert len(writes.queries("conversations")) == (0 if scanning else 1)


async def test_a_customer_without_conversations_is_shown_without_a_query_where_queries_scan(store) -> None:
    import httpx
    from starlette.applications import Starlette

    from services.conversation_state.read_api import read_routes
    from shared.teams import DirectoryWatcher

    store, writes = store
    _point_reads[id(store.conversations.database.client)] = True
    memory = JournaledCustomers(store, interval_s=60)
    lone = Customer(id="cus_1", home_team_id="pnw", home_team_source="area_code", created_at=NOW)
    await memory.append({"cus_1": CustomerRecords(customer=lone)}, {"cus_1": 0})
    await flushed(memory)
    writes.find_filters.clear()
    app = Starlette(routes=read_routes(store, DirectoryWatcher(Path("deploy/teams.yaml")), None, None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        view = (await http.get("/customers/cus_1/conversation")).json()
    assert (view["current"], view["earlier"], view["earlier_total"]) == (None, [], 0)
    assert writes.queries("conversations") == []


async def test_a_customers_earlier_conversations_are_paged_along_the_previous_ones(store) -> None:
    """Where queries scan: newest first, paged, counted; the owner's own documents not stored
    yet are taken; a previous conversation found nowhere ends the list."""
    store, writes = store
    _point_reads[id(store.conversations.database.client)] = True
    docs = {
        f"conv_{n}": {"_id": f"conv_{n}", "previous_conversation_id": f"conv_{n - 1}" if n else None, "opened_at": NOW}
        for n in range(6)
    }
    stored_docs = [compact_document(d, ("opened_at",)) for k, d in docs.items() if k != "conv_3"]
    await store.conversations.insert_many(stored_docs)
    current = docs["conv_5"]
    assert [d["_id"] for d in await store.earlier_conversations(current, {"conv_3": docs["conv_3"]})] == ["conv_4", "conv_3", "conv_2", "conv_1", "conv_0"]
    assert [d["_id"] for d in await store.earlier_conversations(current)] == ["conv_4"]
    assert writes.queries("conversations") == []


async def test_a_conversation_is_paged_by_position_and_counts_the_lines_not_counted_yet(store) -> None:
    store, writes = store
    async with await customer_with_history(store, writes) as http:
        last = (await http.get("/conversations/conv_1?page=5&page_size=50")).json()
        current = (await http.get("/conversations/conv_2?page=1&page_size=2")).json()
        following = (await http.get("/conversations/conv_2?page=2&page_size=2")).json()
        legacy = (await http.get("/conversations/conv_0?page=2&page_size=2")).json()
    assert [line["text"] for line in last["transcript"]] == ["conv_1 201"] and last["transcript_total"] == 201
    assert [line["text"] for line in current["transcript"]] == ["conv_2 1", "conv_2 2"] and current["transcript_total"] == 3
    assert [line["text"] for line in following["transcript"]] == ["conv_2 3"] and following["transcript_total"] == 3
    assert [line["text"] for line in legacy["transcript"]] == ["conv_0 3"] and legacy["transcript_total"] == 3
    assert writes.queries("messages") == [{"conversation_id": {"$in": ["conv_0"]}}]  # lines and count in one


@pytest.mark.parametrize(
    ("first", "replay", "stored"),
    [
        (5, 6, ["conv_1-m2", "conv_1-m1"]),  # a replay by the next owner: its order
        (5, 5, ["conv_1-m2", "conv_1-m1"]),  # the same consumer handling the batch again
        (6, 5, ["conv_1-m1", "conv_1-m2"]),  # a consumer stalled past its session, writing late
        (6, -1, ["conv_1-m1", "conv_1-m2"]),  # (its membership known lapsed)
    ],
)
async def test_a_line_stored_again_at_its_position_is_the_replays_unless_a_later_owner_stored_it(store, first, replay, stored) -> None:
    """A replay after a crash may apply a customer's records in another order: where it puts a
    line, that line is stored, unless a later consumer group generation stored that position;
    a line by message id stored again stays as it was."""
    store, writes = store
    await store.save_lines([said("conv_1", 1, seq=1), said("conv_1", 2, seq=2), said("conv_0", 1)], generation=first)
    await store.save_lines([said("conv_1", 2, seq=1), said("conv_1", 1, seq=2), said("conv_0", 1)], generation=replay)
    # By _id alone (on FerretDB a filter naming any other field scans the collection).
    assert writes.scanning_writes("messages") == [] and writes.queries("messages") == []
    assert [d["message_id"] async for d in store.messages.find({"conversation_id": "conv_1"}).sort("seq")] == stored
    assert await store.messages.count_documents({}) == 3


@pytest.mark.parametrize("scanning", [True, False], ids=["queries-scan", "indexed"])
async def test_a_team_queue_is_paged_oldest_first_in_one_query_where_queries_scan(store, scanning) -> None:
    """Where every query but by ``_id`` scans (the embedded FerretDB) one query of the team's
    open conversations; where indexes serve (MongoDB) a page of those waiting, a count and
    those assigned. The same answer either way."""
    import httpx
    from starlette.applications import Starlette

    from services.conversation_state.read_api import read_routes
    from shared.teams import DirectoryWatcher

    store, writes = store
    _point_reads[id(store.conversations.database.client)] = scanning  # (what buildInfo would tell)
    memory = JournaledCustomers(store, interval_s=60)
    batch = {}
    for n, minutes in enumerate([30, 10, 20, 5]):  # queued this many minutes after NOW
        records = opened(f"cus_{n}", f"conv_{n}")
        conv = records.conversations[f"conv_{n}"]
        conv.team_id, conv.queued_at = "pnw-seattle", NOW + timedelta(minutes=minutes)
        batch[f"cus_{n}"] = records
    routed(batch["cus_3"], "ana")  # assigned: not waiting
    await memory.append(batch, dict.fromkeys(batch, 0))
    await flushed(memory)

    app = Starlette(routes=read_routes(store, DirectoryWatcher(Path("deploy/teams.yaml")), None, None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        writes.finds.clear()
        first = (await http.get("/teams/pnw-seattle/queue?page_size=2")).json()
        # where queries scan, of the open conversations only, not of every one stored
        assert writes.finds.count("conversations") == (0 if scanning else 2)
        assert writes.finds.count("open_conversations") == (1 if scanning else 0)
        second = (await http.get("/teams/pnw-seattle/queue?page_size=2&page=2")).json()
        # resolved, a conversation leaves the queue (and, where queries scan, open_conversations)
        conv = batch["cus_0"].conversations["conv_0"]
        conv.status, conv.resolved_at = ConversationStatus.RESOLVED, NOW + timedelta(hours=1)
        await memory.append({"cus_0": batch["cus_0"]}, {"cus_0": 0})
        await flushed(memory)
        after = (await http.get("/teams/pnw-seattle/queue")).json()
    assert [c["conversation_id"] for c in first["waiting"]] == ["conv_1", "conv_2"]
    assert [c["conversation_id"] for c in second["waiting"]] == ["conv_0"]
    assert first["waiting_total"] == second["waiting_total"] == 3
    assert [c["conversation_id"] for c in first["assigned"]["ana"]] == ["conv_3"]
    assert [c["conversation_id"] for c in after["waiting"]] == ["conv_1", "conv_2"] and after["waiting_total"] == 2
    held = {d["_id"] async for d in store.open_conversations.find({"team_id": {"$ne": None}})}
    assert held == ({"conv_1", "conv_2", "conv_3"} if scanning else set())


async def test_open_conversations_are_filled_once_from_what_an_earlier_version_stored(store) -> None:
    """A database written before ``open_conversations`` existed: at start-up (where queries
    scan) its open conversations are put there once, so the team queue shows them."""
    store, _ = store
    _point_reads[id(store.conversations.database.client)] = True
    waiting, resolved = opened("cus_1", "conv_1").conversations["conv_1"], opened("cus_2", "conv_2").conversations["conv_2"]
    waiting.team_id = resolved.team_id = "pnw-seattle"
    resolved.status = ConversationStatus.RESOLVED
    await store.conversations.insert_many([compact_document(c.to_doc(), CONVERSATION_QUERY_FIELDS) for c in (waiting, resolved)])
    await store.ensure_indexes()
    assert {d["_id"] async for d in store.open_conversations.find({"team_id": "pnw-seattle"})} == {"conv_1"}
    await store.open_conversations.delete_many({"_id": "conv_1"})
    assert await store.fill_open_conversations() == 0  # once per database


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_customer_is_stored_once_its_oldest_change_is_an_interval_old(store) -> None:
    """The message and the routing decision a moment later are one write; an entry stays
    until every customer it holds is stored."""
    store, writes = store
    clock = Clock()
    memory = JournaledCustomers(store, interval_s=1.0, clock=clock)
    first = opened("cus_1", "conv_1")
    second = opened("cus_2", "conv_2")
    await memory.append({"cus_1": first, "cus_2": second}, {"cus_1": 0, "cus_2": 0})  # one entry, both
    clock.now += 0.6
    routed(first, "ana")
    await memory.append({"cus_1": first}, {"cus_1": 0})
    assert memory.due
    memory.store_aged()
    await memory.settle()
    assert writes.of("customers") == [] and writes.of("conversations") == []  # 0.6 s old: held

    clock.now += 0.4  # cus_1's and cus_2's first changes are 1 s old now
    third = opened("cus_3", "conv_3")
    await memory.append({"cus_3": third}, {"cus_3": 1})
    memory.store_aged()
    await memory.settle()
    assert sorted(writes.of("customers")) == [("insert", "cus_1"), ("insert", "cus_2")]
    assert (await stored(store, "conversations", "conv_1"))["agent_id"] == "ana"  # both changes, one insert
    assert [d["p"] async for d in store.journal.find({})] == [1]  # only cus_3's entry is left
    assert set(memory.dirty) == {"cus_3"}

    memory.flush()  # before giving partitions up: everything, whatever its age
    await memory.settle()
    assert ("insert", "cus_3") in writes.of("customers")
    assert await store.journal.count_documents({}) == 0


async def test_an_entry_holding_a_customer_not_stored_yet_is_kept(store, monkeypatch) -> None:
    store, writes = store
    clock = Clock()
    memory = JournaledCustomers(store, interval_s=1.0, clock=clock)
    first = opened("cus_1", "conv_1")
    await memory.append({"cus_1": first}, {"cus_1": 0})
    clock.now += 0.7
    routed(first, "ana")
    await memory.append({"cus_2": opened("cus_2", "conv_2"), "cus_1": first}, {"cus_1": 0, "cus_2": 0})  # holds both
    clock.now += 0.5  # cus_1's oldest change is 1.2 s old, cus_2's 0.5 s

    async def down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("store unreachable")

    monkeypatch.setattr(store.conversations, "insert_many", down)
    memory.store_aged()
    await memory.settle()
    monkeypatch.undo()
    assert set(memory.dirty) == {"cus_1", "cus_2"}  # all put back
    assert sorted(map(sorted, memory.entries.values())) == [["cus_1"], ["cus_1", "cus_2"]]

    memory.store_aged()
    await memory.settle()
    assert [c for _, c in writes.of("customers")] == ["cus_1"]
    assert (await stored(store, "conversations", "conv_1"))["agent_id"] == "ana"
    assert await store.journal.count_documents({}) == 1  # the second entry holds cus_2, not stored yet
    clock.now += 1.0
    memory.store_aged()
    await memory.settle()
    assert await store.journal.count_documents({}) == 0


async def test_recovery_ignores_an_entry_older_than_a_later_store_of_its_customer(store) -> None:
    """An entry stays until every customer it holds is stored, so it can outlive a later store
    of one of them: its version of that customer's conversation must not come back."""
    store, _ = store
    clock = Clock()
    memory = JournaledCustomers(store, interval_s=1.0, clock=clock)
    a = opened("cus_a", "conv_a")
    await memory.append({"cus_a": a}, {"cus_a": 0})
    clock.now += 0.6
    a.conversations["conv_a"].agent_id = "ana"
    await memory.append({"cus_a": a, "cus_b": opened("cus_b", "conv_b")}, {"cus_a": 0, "cus_b": 0})  # holds both
    clock.now += 0.2
    a.conversations["conv_a"].agent_id = "ben"
    await memory.append({"cus_a": a}, {"cus_a": 0})
    clock.now += 0.2
    memory.store_aged()  # cus_a stored (agent ben); the entry holding cus_b stays, with ana in it
    await memory.settle()
    assert (await stored(store, "conversations", "conv_a"))["agent_id"] == "ben"
    assert a.customer is not None
    a.customer.applied["decisions/0"] = 99  # a change to the customer only
    await memory.append({"cus_a": a}, {"cus_a": 0})
    # kill -9 (or a failed batch): the next owner recovers from the journal.

    after = JournaledCustomers(store, interval_s=1.0)
    await after.recover([0])
    recovered = after.take(["cus_a", "cus_b"])
    assert recovered["cus_a"].conversations["conv_a"].agent_id == "ben"
    assert recovered["cus_a"].customer is not None and recovered["cus_a"].customer.applied["decisions/0"] == 99
    assert "cus_b" in recovered  # never stored: from the entry
    await flushed(after)
    assert (await stored(store, "conversations", "conv_a"))["agent_id"] == "ben"
    assert await store.journal.count_documents({}) == 0


def messaged(records: CustomerRecords, count: int = 1) -> Conversation:
    """A customer's further messages: counters and times change, no field the read API queries."""
    assert records.customer is not None and records.customer.last_conversation_id is not None
    conv = records.conversations[records.customer.last_conversation_id]
    conv.inbound_count += count
    conv.updated_at = conv.last_customer_message_at = NOW + timedelta(seconds=10 + conv.inbound_count)
    records.customer.applied["messages/0"] += count
    return conv


def reopened(records: CustomerRecords, conv_id: str) -> None:
    """The customer's last conversation ended and a new one opens."""
    assert records.customer is not None
    fresh = opened(records.customer.id, conv_id).conversations[conv_id]
    records.conversations[conv_id] = fresh
    records.customer.open_conversation_id = records.customer.last_conversation_id = conv_id


async def expanded(store: ConversationStore, conv_id: str) -> dict[str, Any]:
    doc = await stored(store, "conversations", conv_id)
    assert doc is not None
    return expand_document(doc)


async def held_then_reopened(memory: JournaledCustomers, messages: int) -> CustomerRecords:
    """conv_1 stored, then ``messages`` more stored only in the customer's document (held),
    then conv_2 opened and journaled, not stored."""
    records = opened("cus_1", "conv_1")
    await memory.append({"cus_1": records}, {"cus_1": 0})
    await flushed(memory)
    messaged(records, messages)
    await memory.append({"cus_1": records}, {"cus_1": 0})
    await flushed(memory)  # conv_1's count is only in the customer's document
    reopened(records, "conv_2")
    await memory.append({"cus_1": records}, {"cus_1": 0})
    return records


async def test_a_change_to_no_queried_field_rewrites_only_the_customer(store) -> None:
    store, writes = store
    memory = JournaledCustomers(store, interval_s=60)
    records = opened("cus_1", "conv_1")
    routed(records, "ana")
    await memory.append({"cus_1": records}, {"cus_1": 0})
    await flushed(memory)
    writes.ops.clear()

    messaged(records, 2)
    await memory.append({"cus_1": records}, {"cus_1": 0})
    await flushed(memory)
    assert writes.of("customers") == await rewrite_of(store, "cus_1")
    assert writes.of("conversations") == []  # its customer's document holds the change
    assert (await expanded(store, "conv_1"))["inbound_count"] == 0  # trails ...
    assert (await store.find_conversation("conv_1"))["inbound_count"] == 2  # ... what the store answers with
    assert (await store.overlay_held([await expanded(store, "conv_1")]))[0]["inbound_count"] == 2
    loaded = await store.load(["cus_1"], ["conv_1"])
    assert loaded["cus_1"].conversations["conv_1"].inbound_count == 2

    writes.ops.clear()
    conv = loaded["cus_1"].conversations["conv_1"]
    conv.status = ConversationStatus.WAITING_ON_CUSTOMER  # a queried field
    await store.save(loaded.values(), [])
    assert writes.of("conversations") == [("update", "conv_1")]
    assert (await expanded(store, "conv_1"))["inbound_count"] == 2  # written in full


async def test_a_conversation_no_longer_current_is_written_in_full(store) -> None:
    store, writes = store
    memory = JournaledCustomers(store, interval_s=60)
    records = await held_then_reopened(memory, 1)
    writes.ops.clear()
    await flushed(memory)
    assert sorted(writes.of("conversations")) == [("insert", "conv_2"), ("update", "conv_1")]
    assert (await expanded(store, "conv_1"))["inbound_count"] == 1
    assert list(records.conversations) == ["conv_2"]  # the earlier one is read again if needed


async def test_recovery_keeps_a_held_conversation_a_later_batch_let_go(store) -> None:
    store, _ = store
    await held_then_reopened(JournaledCustomers(store, interval_s=60), 3)
    # kill -9: conv_2 is only journaled

    after = JournaledCustomers(store, interval_s=60)
    await after.recover([0])
    await flushed(after)
    assert (await expanded(store, "conv_1"))["inbound_count"] == 3
    assert (await expanded(store, "conv_2"))["status"] == "waiting_on_agent"
    customer = expand_document(await stored(store, "customers", "cus_1"))
    assert customer["last_conversation_id"] == "conv_2"
    assert [c["_id"] for c in customer["held"]] == ["conv_2"]


async def test_a_failed_write_keeps_the_conversation_it_let_go(store, monkeypatch) -> None:
    store, _ = store
    memory = JournaledCustomers(store, interval_s=60)
    records = await held_then_reopened(memory, 2)

    async def down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("store unreachable")

    monkeypatch.setattr(store.conversations, "bulk_write", down)
    await flushed(memory)
    monkeypatch.undo()
    assert set(records.conversations) == {"conv_1", "conv_2"}  # taken back
    await flushed(memory)
    assert (await expanded(store, "conv_1"))["inbound_count"] == 2
    assert list(records.conversations) == ["conv_2"]


async def test_the_read_api_answers_with_the_copy_the_customer_holds(store) -> None:
    """Another replica reads from the store: a current conversation's counters come from its
    customer's document, in every view (conversation, customer, team queue)."""
    import httpx
    from starlette.applications import Starlette

    from services.conversation_state.read_api import read_routes
    from shared.teams import DirectoryWatcher

    store, _ = store
    memory = JournaledCustomers(store, interval_s=60)
    assigned, waiting = opened("cus_1", "conv_1"), opened("cus_2", "conv_2")
    for r in (assigned, waiting):
        r.conversations[r.customer.last_conversation_id].team_id = "pnw-seattle"  # type: ignore[union-attr]
    routed(assigned, "ana")
    await memory.append({"cus_1": assigned, "cus_2": waiting}, {"cus_1": 0, "cus_2": 0})
    await flushed(memory)
    messaged(assigned, 3)
    messaged(waiting, 2)
    await memory.append({"cus_1": assigned, "cus_2": waiting}, {"cus_1": 0, "cus_2": 0})
    await flushed(memory)
    assert [(await expanded(store, c))["inbound_count"] for c in ("conv_1", "conv_2")] == [0, 0]  # their own documents trail

    other = Starlette(routes=read_routes(store, DirectoryWatcher(Path("deploy/teams.yaml")), None, None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other), base_url="http://test") as elsewhere:
        assert (await elsewhere.get("/conversations/conv_1")).json()["inbound_count"] == 3
        assert (await elsewhere.get("/customers/cus_1/conversation")).json()["current"]["inbound_count"] == 3
        queue = (await elsewhere.get("/teams/pnw-seattle/queue")).json()
        assert [c["inbound_count"] for c in queue["assigned"]["ana"]] == [3]
        assert [(c["conversation_id"], c["inbound_count"]) for c in queue["waiting"]] == [("conv_2", 2)]


async def test_documents_stored_before_customers_held_conversations_are_read_and_carried_on(store) -> None:
    """An upgrade: the customer's document holds no conversation (written by an earlier
    version), the conversation's own document is whole; the new version reads both, and the
    next counters-only change goes into the customer's document."""

    from services.conversation_state.store import CONVERSATION_QUERY_FIELDS

    store, writes = store
    old = opened("cus_1", "conv_1")
    messaged(old, 2)
    assert old.customer is not None
    await store.customers.insert_one(compact_document(old.customer.to_doc()))
    await store.conversations.insert_one(compact_document(old.conversations["conv_1"].to_doc(), CONVERSATION_QUERY_FIELDS))

    loaded = await store.load(["cus_1"], [])
    assert loaded["cus_1"].conversations["conv_1"].inbound_count == 2
    writes.ops.clear()
    messaged(loaded["cus_1"])
    await store.save(loaded.values(), [])
    assert writes.of("conversations") == [] and writes.of("customers") == [("update", "cus_1")]
    assert (await store.find_conversation("conv_1"))["inbound_count"] == 3
    assert (await expanded(store, "conv_1"))["inbound_count"] == 2


async def test_a_flush_larger_than_one_slice_writes_every_customer_and_conversation(store, monkeypatch) -> None:
    """A flush after a backlog is encoded and written a slice at a time: every document still
    lands, the new ones inserted, one that exists already (a replay) replaced."""
    import services.conversation_state.store as conversation_store

    store, _ = store
    monkeypatch.setattr(conversation_store, "UPSERT_SLICE", 7)
    memory = JournaledCustomers(store, interval_s=60)
    # Stored before by another owner, but not known to this one: its insert is refused and replaced.
    earlier = opened("cus_03", "conv_03")
    await store.write_changes(conversation_store.changes_of([earlier]))
    customers = {f"cus_{n:02d}": opened(f"cus_{n:02d}", f"conv_{n:02d}") for n in range(30)}
    await memory.append(customers, dict.fromkeys(customers, 0))
    for r in customers.values():
        routed(r, "ana")
    await memory.append(customers, dict.fromkeys(customers, 0))
    await flushed(memory)
    found = await store.find_customers(customers)
    assert sorted(found) == sorted(customers)
    assert all(doc["rev"] == customers[cid].customer.rev for cid, doc in found.items())  # type: ignore[union-attr]
    conversations = await store.find_conversations(f"conv_{n:02d}" for n in range(30))
    assert len(conversations) == 30
    assert all(doc["agent_id"] == "ana" for doc in conversations.values())


async def rewrite_of(store: ConversationStore, customer_id: str) -> list[tuple[str, str]]:
    """The writes a flush rewrites a stored customer with: a delete and an insert where the
    store does that for less (FerretDB), else a replace."""
    if await delete_then_insert_is_cheaper(store.customers):
        return [("delete", customer_id), ("insert", customer_id)]
    return [("update", customer_id)]


def customer_only_change(records: CustomerRecords) -> None:
    """A change to the customer's own fields alone (here: an input applied)."""
    assert records.customer is not None
    records.customer.applied["customers/0"] = records.customer.applied.get("customers/0", 0) + 1


async def test_an_entry_holds_the_customers_current_conversations_even_unchanged(store) -> None:
    store, _ = store
    memory = JournaledCustomers(store, interval_s=60)
    records = opened("cus_1", "conv_1")
    await memory.append({"cus_1": records}, {"cus_1": 0})
    customer_only_change(records)
    await memory.append({"cus_1": records}, {"cus_1": 0})
    from services.conversation_state.write_behind import entry_contents

    newest = max([d async for d in store.journal.find({})], key=lambda d: d["_id"])
    contents = entry_contents(newest)
    assert [c["_id"] for c in contents["customers"]] == ["cus_1"]
    assert [c["_id"] for c in contents["conversations"]] == ["conv_1"]  # unchanged, but current


async def test_a_crash_between_deleting_and_inserting_a_customer_loses_nothing(store) -> None:
    """The customer's document is the only current copy of its conversation's counters (the
    conversation's own document trails); its newest journal entry holds them too."""
    store, _ = store
    await between_delete_and_insert(store)  # ... and the process died there
    assert (await expanded(store, "conv_1"))["inbound_count"] == 0  # the count is in the customer's document only

    after = JournaledCustomers(store, interval_s=60)
    await after.recover([0])
    recovered = after.take(["cus_1"])["cus_1"]
    assert recovered.conversations["conv_1"].inbound_count == 2
    assert recovered.conversations["conv_1"].agent_id == "ana"
    assert recovered.customer is not None and recovered.customer.applied["customers/0"] == 1
    await flushed(after)
    assert (await store.find_conversation("conv_1"))["inbound_count"] == 2
    assert await store.journal.count_documents({}) == 0


async def test_only_customers_this_process_journaled_are_rewritten_by_delete_and_insert(store) -> None:
    """One overlaid from another process's entry (an earlier version's held only what
    changed) is replaced; and where the store replaces for less (MongoDB), every one is."""
    store, writes = store
    first = JournaledCustomers(store, interval_s=60)
    records = opened("cus_1", "conv_1")
    await first.append({"cus_1": records}, {"cus_1": 0})
    await flushed(first)
    customer_only_change(records)
    await first.append({"cus_1": records}, {"cus_1": 0})  # journaled, then the process died

    after = JournaledCustomers(store, interval_s=60)
    await after.recover([0])
    writes.ops.clear()
    await flushed(after)
    assert writes.of("customers") == [("update", "cus_1")]  # overlaid: replaced

    again = after.take(["cus_1"]).get("cus_1") or (await store.load(["cus_1"], []))["cus_1"]
    customer_only_change(again)
    await after.append({"cus_1": again}, {"cus_1": 0})
    writes.ops.clear()
    await flushed(after)
    assert writes.of("customers") == await rewrite_of(store, "cus_1")  # journaled here: either way

    client = store.customers.database.client
    _point_reads[id(client)] = False  # what a MongoDB server answers: a replace is cheap there
    again = after.take(["cus_1"]).get("cus_1") or (await store.load(["cus_1"], []))["cus_1"]
    customer_only_change(again)
    await after.append({"cus_1": again}, {"cus_1": 0})
    writes.ops.clear()
    await flushed(after)
    assert writes.of("customers") == [("update", "cus_1")]
    loaded = await store.load(["cus_1"], [])
    assert loaded["cus_1"].customer is not None and loaded["cus_1"].customer.applied["customers/0"] == 3


async def between_delete_and_insert(store: ConversationStore) -> CustomerRecords:
    """cus_1 stored with conv_1 (2 messages, held only in the customer's document), then a
    change journaled, and the flush that rewrites it has deleted the customer's document and
    not inserted it yet."""
    owner = JournaledCustomers(store, interval_s=60)
    records = opened("cus_1", "conv_1")
    routed(records, "ana")
    records.conversations["conv_1"].team_id = "pnw-seattle"
    await owner.append({"cus_1": records}, {"cus_1": 0})
    await flushed(owner)
    messaged(records, 2)
    await owner.append({"cus_1": records}, {"cus_1": 0})
    await flushed(owner)
    customer_only_change(records)
    await owner.append({"cus_1": records}, {"cus_1": 0})
    await store.customers.delete_one({"_id": "cus_1"})
    return records


async def test_another_replica_reads_a_customer_between_the_owners_delete_and_insert(store) -> None:
    """The newest journal entry holds the customer and its current conversation: another
    replica's read API answers from it instead of a 404 or the conversation's trailing
    document."""
    import httpx
    from starlette.applications import Starlette

    from services.conversation_state.read_api import read_routes
    from shared.teams import DirectoryWatcher

    store, _ = store
    await between_delete_and_insert(store)
    other = Starlette(routes=read_routes(store, DirectoryWatcher(Path("deploy/teams.yaml")), None, None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other), base_url="http://test") as elsewhere:
        customer = await elsewhere.get("/customers/cus_1/conversation")
        assert customer.status_code == 200, customer.text
        assert customer.json()["customer"]["home_team_id"] == "pnw"
        assert customer.json()["current"]["inbound_count"] == 2
        assert customer.json()["current"]["agent_id"] == "ana"
        assert (await elsewhere.get("/conversations/conv_1")).json()["inbound_count"] == 2
        queue = (await elsewhere.get("/teams/pnw-seattle/queue")).json()
        assert [c["inbound_count"] for c in queue["assigned"]["ana"]] == [2]
        assert (await elsewhere.get("/customers/cus_nobody/conversation")).status_code == 404


async def test_the_newest_journaled_copy_of_a_customer_is_read(store) -> None:
    store, _ = store
    records = await between_delete_and_insert(store)
    messaged(records, 3)
    later = JournaledCustomers(store, interval_s=60)  # (another process; its rev is higher)
    await later.append({"cus_1": records}, {"cus_1": 0})
    found = await store.find_customer("cus_1")
    assert found is not None and Customer.from_doc(found).applied == records.customer.applied  # type: ignore[union-attr]
    assert [c["inbound_count"] for c in found["held"]] == [5]


async def test_a_customer_stored_while_the_journal_was_read_is_read_again(store, monkeypatch) -> None:
    """The entry goes only after the insert: a customer in neither place when looked for is
    in the store by then."""
    store, _ = store
    await between_delete_and_insert(store)
    journaled = await store.journaled_customers({"cus_1"})
    reads = []

    async def insert_lands_then_entry_goes(ids):
        reads.append(set(ids))
        await store.customers.insert_one(compact_document(journaled["cus_1"]))
        await store.journal.delete_many({})
        return {}

    monkeypatch.setattr(store, "journaled_customers", insert_lands_then_entry_goes)
    found = await store.find_customer("cus_1")
    assert reads == [{"cus_1"}]
    assert found is not None and [c["inbound_count"] for c in found["held"]] == [2]


@pytest.mark.parametrize("held", [False, True], ids=["own-documents", "held-copy-trailing"])
async def test_a_customer_kept_stored_and_unchanged_sheds_its_stored_documents_and_rebuilds_them_as_read(store, held) -> None:
    """Between batches a stored, unchanged customer keeps no copy of its stored documents
    (half of what it costs in memory): taken again, they are rebuilt from its records exactly
    as a read of the store makes them, so the next change writes only what changed."""
    store, writes = store
    memory = JournaledCustomers(store, interval_s=60)
    records = opened("cus_1", "conv_1")
    await memory.append({"cus_1": records}, {"cus_1": 0})
    await flushed(memory)
    if held:  # conv_1's newer copy only in the customer's document: its own trails
        messaged(records, 2)
        await memory.append({"cus_1": records}, {"cus_1": 0})
        await flushed(memory)
    assert records.stored and not records.stored_derived
    await flushed(memory)  # the next flush sheds what the last write stored
    assert records.stored == {} and records.stored_derived
    assert records.trailing == ({"conv_1"} if held else set())

    taken = memory.take(["cus_1"])["cus_1"]
    assert taken is records and not records.stored_derived
    read = (await store.load(["cus_1"], []))["cus_1"]  # the same customer read from the store
    assert records.stored == read.stored
    assert records.trailing == ({"conv_1"} if held else set())  # (a read assumes any held copy may trail)

    writes.ops.clear()
    routed(records, "ana")  # a queried field: the conversation's own document is rewritten
    await memory.append({"cus_1": records}, {"cus_1": 0})
    await flushed(memory)
    assert writes.of("conversations") == [("update", "conv_1")]
    assert writes.of("customers") == await rewrite_of(store, "cus_1")
    assert (await expanded(store, "conv_1"))["agent_id"] == "ana"


async def test_a_customer_changed_after_its_write_keeps_what_a_write_needs_of_its_stored_documents(store) -> None:
    """Journaled since stored: of the stored documents only their ids, queried fields and
    which changed since are kept (not a second copy of the customer), and the write they
    need is the same."""
    store, writes = store
    memory, records = await stored_then_routed(store)  # changed again since its write: dirty
    memory.flush(min_age_s=3600)  # a flush that stores nothing (the change is too recent)
    await memory.settle()
    assert records.stored == {} and not records.stored_derived
    summary = records.summary
    assert summary is not None and set(summary.queried) == {"cus_1", "conv_1"}
    assert summary.queried["conv_1"] is not None and summary.queried["conv_1"][4] is None  # (agent_id, as stored)
    assert summary.changed == {"cus_1", "conv_1"}
    await flushed(memory)
    assert writes.of("conversations")[-1] == ("update", "conv_1")  # a queried field changed: its own document
    assert (await expanded(store, "conv_1"))["agent_id"] == "ana"
    assert records.summary is None and records.stored["conv_1"] == records.conversations["conv_1"].to_doc()


async def test_a_customer_read_unchanged_while_its_write_is_in_flight_keeps_its_stored_documents(store, monkeypatch) -> None:
    """A customer whose write is in flight (it may fail, and then be written again from its
    stored documents) is not shed, even if a batch meanwhile takes it and changes nothing."""
    store, _ = store
    memory, records = await stored_then_routed(store)

    release = asyncio.Event()
    write_changes = store.write_changes

    async def failing_later(*args: Any, **kwargs: Any) -> None:
        await release.wait()
        raise ConnectionError("store unreachable")

    monkeypatch.setattr(store, "write_changes", failing_later)
    memory.flush()  # the routed change's write, in flight
    await first_slice_made()
    taken = memory.take(["cus_1"])
    await memory.append(taken, {"cus_1": 0})  # a batch that changed nothing
    memory.flush()  # (sheds what is settled; the write is still in flight)
    assert records.stored and not records.stored_derived
    release.set()
    await memory.settle()  # failed: dirty again
    monkeypatch.setattr(store, "write_changes", write_changes)
    await flushed(memory)
    assert (await expanded(store, "conv_1"))["agent_id"] == "ana"  # written on the retry


async def test_while_a_write_is_in_flight_its_customers_keep_only_the_documents_it_writes(store, monkeypatch) -> None:
    """The documents a write replaces are let go when it starts (not kept beside the new ones
    until it lands): the records' ``stored`` are the documents being written."""
    store, _ = store
    memory, records = await stored_then_routed(store)  # stored without an agent; routed since
    release = asyncio.Event()
    write_changes = store.write_changes

    async def held_back(*args: Any, **kwargs: Any) -> None:
        await release.wait()
        await write_changes(*args, **kwargs)

    monkeypatch.setattr(store, "write_changes", held_back)
    memory.flush()
    await first_slice_made()
    assert records.stored["conv_1"]["agent_id"] == "ana"  # (the store's document has none yet)
    assert records.stored["cus_1"]["held"] == [records.stored["conv_1"]]
    release.set()
    await memory.settle()
    assert (await expanded(store, "conv_1"))["agent_id"] == "ana"


async def test_a_write_that_failed_half_way_is_redone_in_full(store, monkeypatch) -> None:
    """The conversations landed, the customers did not: the records no longer claim to know
    what is stored, so the next write writes every document again (inserting, replacing what
    exists), and the store ends as the records are."""
    store, writes = store
    memory, records = await stored_then_routed(store)
    messaged(records)
    await memory.append({"cus_1": records}, {"cus_1": 0})
    replace_customers = store.customers.bulk_write
    insert_customers = store.customers.insert_many

    async def down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("store unreachable")

    monkeypatch.setattr(store.customers, "bulk_write", down)
    monkeypatch.setattr(store.customers, "insert_many", down)
    await flushed(memory)
    assert memory.write_failed and "cus_1" in memory.dirty
    assert (await expanded(store, "conv_1"))["agent_id"] == "ana"  # this part landed
    assert records.stored == {}
    monkeypatch.setattr(store.customers, "bulk_write", replace_customers)
    monkeypatch.setattr(store.customers, "insert_many", insert_customers)
    before = len(writes.of("conversations"))
    await flushed(memory)
    assert not memory.write_failed and memory.dirty == {}
    assert {doc_id for _, doc_id in writes.of("conversations")[before:]} == {"conv_1"}  # written again in full
    customer = expand_document(await stored(store, "customers", "cus_1"))
    assert customer["applied_offsets"] == records.customer.applied  # type: ignore[union-attr]
    assert customer["held"] == [records.conversations["conv_1"].to_doc()]
    assert expand_document(await stored(store, "conversations", "conv_1")) == records.conversations["conv_1"].to_doc()
    assert await store.journal.count_documents({}) == 0


async def test_a_write_in_slices_that_fails_half_way_stores_everything_on_the_retry(store, monkeypatch) -> None:
    """Seven customers stored three at a time; the second slice fails: the first is in the
    store, the rest dirty (their journal entry kept), and the retry stores them all, each as
    its records are, and deletes the entry."""
    store, _ = store
    memory = JournaledCustomers(store, interval_s=60, write_slice=3)
    customers = {f"cus_{n}": opened(f"cus_{n}", f"conv_{n}") for n in range(7)}
    await memory.append(customers, {cid: 0 for cid in customers})
    await flushed(memory)
    for n, records in enumerate(customers.values()):
        routed(records, f"agent_{n}")
    await memory.append(customers, {cid: 0 for cid in customers})
    (entry,) = memory.entries
    write_changes = store.write_changes
    calls = 0

    async def second_fails(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ConnectionError("store unreachable")
        await write_changes(*args, **kwargs)

    monkeypatch.setattr(store, "write_changes", second_fails)
    await flushed(memory)
    assert calls == 2 and memory.write_failed
    assert [(await expanded(store, f"conv_{n}"))["agent_id"] for n in range(3)] == ["agent_0", "agent_1", "agent_2"]
    assert set(memory.dirty) == {f"cus_{n}" for n in range(3, 7)}
    assert memory.entries == {entry: set(memory.dirty)}
    assert await store.journal.find_one({"_id": entry}) is not None
    await flushed(memory)
    assert calls == 4 and not memory.write_failed and memory.unstored == 0
    for n in range(7):
        doc = await expanded(store, f"conv_{n}")
        customer = await store.find_customer(f"cus_{n}")
        assert doc["agent_id"] == f"agent_{n}" and customer is not None
        assert Customer.from_doc(customer).applied["decisions/0"] == 7  # the offsets written with it
    assert memory.entries == {} and await store.journal.find_one({"_id": entry}) is None


async def test_lines_not_stored_yet_are_read_with_the_stored_ones(store) -> None:
    """The owner's read API passes the lines its write behind has not stored yet
    (``JournaledCustomers.unstored_lines``): read at their positions, past the count, and in
    time order among a conversation's lines stored by message id."""
    store, _ = store
    await store.save_lines([said("conv_1", 1, seq=1), said("conv_0", 1), said("conv_0", 3)])
    unstored = {d["_id"]: d for d in (said("conv_1", 2, seq=2).to_doc(), said("conv_0", 2).to_doc())}
    lines, total = await store.read_page({"_id": "conv_1", "line_count": 1}, 0, 10, unstored)
    assert ([d["text"] for d in lines], total) == (["conv_1 1", "conv_1 2"], 2)
    lines, total = await store.read_page({"_id": "conv_0"}, 0, 10, unstored)
    assert ([d["text"] for d in lines], total) == (["conv_0 1", "conv_0 2", "conv_0 3"], 3)
    both = await store.read_transcripts([{"_id": "conv_1", "line_count": 2}, {"_id": "conv_0"}], unstored=unstored)
    assert {k: [d["text"] for d in v] for k, v in both.items()} == {"conv_1": ["conv_1 1", "conv_1 2"], "conv_0": ["conv_0 1", "conv_0 2", "conv_0 3"]}
    assert (await store.read_page({"_id": "conv_1", "line_count": 1}, 0, 10))[1] == 1  # (without them: stored only)
