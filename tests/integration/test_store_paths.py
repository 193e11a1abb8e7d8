"""The store paths the services' speed rests on, against the real store: point reads by _id
answered from an index (on FerretDB through the index deploy/ferretdb adds), conversation
documents written only when they changed, and sweeper heads replacing per-entity scans."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo import ASCENDING, AsyncMongoClient, ReplaceOne, monitoring
from pymongo.errors import BulkWriteError, DuplicateKeyError

from shared.runtime.store import _point_reads, create_query_index, find_by_ids

from services.conversation_state.lifecycle import CustomerRecords
from services.conversation_state.model import Customer
from services.conversation_state.store import ConversationStore
from services.timeout_sweeper.deadlines import Arm, Cancel
from services.timeout_sweeper.store import CLOCK_SKEW, NO_HEAD, DeadlineStore, Head

pytestmark = pytest.mark.integration


class Writes(monitoring.CommandListener):
    def __init__(self) -> None:
        self.updates: list[str] = []
        self.inserts: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "update":
            self.updates.extend(u["q"]["_id"] for u in event.command["updates"])
        if event.command_name == "insert":
            self.inserts.extend(d["_id"] for d in event.command["documents"])

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def _first_and_last_read(docs: Any) -> tuple[float, float]:
    """Seconds per find_one of the first and of the last of 20,000 fresh documents."""
    await docs.insert_many([{"_id": f"k{i:06d}", "pad": "x" * 200} for i in range(20_000)])
    await docs.find_one({"_id": "k000000"})
    await asyncio.sleep(1.5)  # the embedded FerretDB indexes new collections within 0.5 s

    async def per_read(key: str) -> float:
        started = time.perf_counter()
        for _ in range(20):
            assert (await docs.find_one({"_id": key}))["_id"] == key
        return (time.perf_counter() - started) / 20

    return await per_read("k000000"), await per_read("k019999")


async def test_a_point_read_does_not_scan_the_collection(infra, mongo_db_name) -> None:
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True)
    try:
        docs = client[mongo_db_name]["docs"]
        first, last = await _first_and_last_read(docs)
        # A scan reads 20,000 documents to reach the last one (~80 ms on FerretDB without the
        # index); with it both reads cost the same.
        assert last < max(5 * first, 0.010), (first, last)
        found = await find_by_ids(docs, ["k000001", "missing", "k019998", "k000001"])
        assert sorted(found) == ["k000001", "k019998"]
        # Detected once per client: FerretDB reports its version in buildInfo.
        assert _point_reads[id(client)] is ("ferretdbVersion" in await client.admin.command("buildInfo"))
        # The form MongoDB gets (one $in) answers the same, here too (slowly: FerretDB scans).
        _point_reads[id(client)] = False
        assert await find_by_ids(docs, ["k000001", "missing", "k019998", "k000001"]) == found
    finally:
        await client.close()


async def test_query_indexes_are_created_only_where_the_server_uses_them(infra, mongo_db_name) -> None:
    """FerretDB 1.24 answers only an exact ``_id`` filter from an index: a secondary index
    there serves no query and costs every write, so none is created; MongoDB gets it."""
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True)
    try:
        docs = client[mongo_db_name]["queried"]
        await docs.insert_one({"_id": "a", "k": 1})
        ferretdb = "ferretdbVersion" in await client.admin.command("buildInfo")
        created = await create_query_index(docs, [("k", ASCENDING)])
        names = {i["name"] async for i in await docs.list_indexes()}
        assert (created, "k_1" in names) == ((None, False) if ferretdb else ("k_1", True))
        _point_reads[id(client)] = False  # what a MongoDB server answers
        assert await create_query_index(docs, [("k", ASCENDING)]) == "k_1"
        assert "k_1" in {i["name"] async for i in await docs.list_indexes()}
    finally:
        await client.close()


async def test_the_id_index_the_reads_use_still_refuses_duplicates(infra, mongo_db_name) -> None:
    """The embedded FerretDB rebuilds each collection's unique _id index on the expression its
    lookups use (``deploy/ferretdb/idindex.go``): duplicates are refused as before, by insert
    and by an upsert, and the index FerretDB lists is still there."""
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True)
    try:
        docs = client[mongo_db_name]["docs"]
        await _first_and_last_read(docs)  # waits for the keeper's pass
        with pytest.raises(DuplicateKeyError):
            await docs.insert_one({"_id": "k000007"})
        with pytest.raises(BulkWriteError) as refused:
            await docs.insert_many([{"_id": "fresh"}, {"_id": "k019999"}], ordered=True)
        assert refused.value.details["writeErrors"][0]["code"] == 11000
        await docs.replace_one({"_id": "k000007"}, {"pad": "y"}, upsert=True)
        await docs.replace_one({"_id": "new"}, {"pad": "z"}, upsert=True)
        assert [d["pad"] async for d in docs.find({"_id": {"$in": ["k000007", "new"]}}).sort("_id", 1)] == ["y", "z"]
        assert await docs.count_documents({}) == 20_002  # 20,000 + "fresh" + "new": nothing doubled
        assert "_id_" in {i["name"] async for i in await docs.list_indexes()}
    finally:
        await client.close()


async def test_databases_dropped_and_created_again_stay_readable_and_indexed(infra, mongo_db_name) -> None:
    """The embedded FerretDB's index keeper once kept a connection to each database across
    its passes: after a database was dropped and created again, closing that connection
    removed the new database's write-ahead log ("file is not a database" on the next write,
    and FerretDB no longer started), or the new collections never got their lookup index."""
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True)
    names = (mongo_db_name, mongo_db_name + "_b")
    try:
        for _ in range(3):
            for name in names:
                await client.drop_database(name)
            await client[names[0]]["cust"].insert_many([{"_id": f"c{i}", "n": 0, "pad": "x" * 300} for i in range(2000)])
            await client[names[1]]["msgs"].insert_one({"_id": "m"})
            await asyncio.sleep(0.7)  # one pass of the keeper sees both
            for start in range(0, 2000, 20):
                await client[names[0]]["cust"].bulk_write([ReplaceOne({"_id": f"c{i}"}, {"n": 1}) for i in range(start, start + 20)])
                await client[names[1]]["msgs"].insert_one({"_id": f"m{start}"})
        assert await client[names[0]]["cust"].count_documents({"n": 1}) == 2000
        first, last = await _first_and_last_read(client[names[0]]["docs"])
        assert last < max(5 * first, 0.010), (first, last)
    finally:
        await client.drop_database(names[1])
        await client.close()


async def test_only_changed_conversation_documents_are_written_again(infra, mongo_db_name) -> None:
    writes = Writes()
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True, event_listeners=[writes])
    try:
        store = ConversationStore(client[mongo_db_name])
        now = datetime.now(UTC)
        records = CustomerRecords(customer=Customer(id="cus_1", home_team_id="pnw-seattle", home_team_source="area_code", created_at=now))
        await store.save([records], [])
        assert (writes.inserts, writes.updates) == (["cus_1"], [])  # new: inserted
        await store.save([records], [])  # unchanged: nothing to write
        assert (writes.inserts, writes.updates) == (["cus_1"], [])
        records.customer.seq += 1
        await store.save([records], [])
        assert (writes.inserts, writes.updates) == (["cus_1"], ["cus_1"])  # stored before: replaced
        loaded = await store.load(["cus_1"], [])
        assert loaded["cus_1"].customer.seq == 1
        await store.save(loaded.values(), [])  # read back unchanged: not written either
        assert (writes.inserts, writes.updates) == (["cus_1"], ["cus_1"])
    finally:
        await client.close()


async def test_a_document_believed_new_that_exists_is_replaced(infra, mongo_db_name) -> None:
    """A replay after a crash: the records are rebuilt as new, but the first attempt stored them."""
    writes = Writes()
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True, event_listeners=[writes])
    try:
        store = ConversationStore(client[mongo_db_name])
        now = datetime.now(UTC)

        def fresh(seq: int) -> CustomerRecords:
            customer = Customer(id="cus_2", home_team_id="pnw-seattle", home_team_source="area_code", created_at=now, seq=seq)
            return CustomerRecords(customer=customer)

        await store.save([fresh(1)], [])
        await store.save([fresh(2), CustomerRecords(customer=Customer(id="cus_3", home_team_id="x", home_team_source="y", created_at=now))], [])
        assert writes.inserts == ["cus_2", "cus_2", "cus_3"]
        assert writes.updates == ["cus_2"]  # only the one that existed
        stored = await store.load(["cus_2", "cus_3"], [])
        assert (stored["cus_2"].customer.seq, stored["cus_3"].customer.home_team_id) == (2, "x")
    finally:
        await client.close()


async def test_sweeper_heads_supersede_and_cancel_armings(infra, mongo_db_name) -> None:
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True)
    try:
        store = DeadlineStore(client[mongo_db_name])
        now = datetime.now(UTC)
        first = Arm("response", "conv-1", now + timedelta(minutes=5), "0001", {})
        second = Arm("response", "conv-1", now + timedelta(minutes=9), "0002", {})
        other = Arm("response", "conv-2", now + timedelta(minutes=5), "0001", {})
        await store.apply({("response", "conv-1"): first, ("response", "conv-2"): other}, now)
        assert await store.existing("response", ["conv-1", "conv-2", "conv-3"], now) == {"conv-1", "conv-2"}
        await store.apply({("response", "conv-1"): second}, now)
        await store.apply({("response", "conv-1"): second}, now)  # a replay changes nothing
        ids = sorted([d["_id"] async for d in store.deadlines.find({"entity": "conv-1"})])
        assert ids == [second.doc_id]
        await store.done([other.doc_id])  # fired by the sweeper once due
        assert await store.existing("response", ["conv-2"], other.due_at) == set()
        await store.apply({("response", "conv-1"): Cancel("response", "conv-1")}, now)
        assert await store.existing("response", ["conv-1"], now) == set()
        assert [d async for d in store.deadlines.find({"entity": "conv-1"})] == []
    finally:
        await client.close()


class Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.names.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_identities_are_created_insert_first_and_existing_ones_still_win(infra, mongo_db_name) -> None:
    from services.ingest.identity import IdentityDirectory
    from shared.contracts.channel import ChannelMessagePosted

    def sms(number: str, n: int) -> ChannelMessagePosted:
        return ChannelMessagePosted(channel="sms", provider_message_id=f"SM{n}", address=number, text="hi", sent_at=datetime.now(UTC))

    def app(account: str, phone: str) -> ChannelMessagePosted:
        return ChannelMessagePosted(
            channel="app", provider_message_id=f"APP{account}", address=account, text="hi", authenticated=True, linked_phone=phone, sent_at=datetime.now(UTC)
        )

    commands = Commands()
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True, event_listeners=[commands])
    try:
        db = client[mongo_db_name]
        first = IdentityDirectory(db)
        created, minted = await first.resolve_batch(
            [sms("+12065550001", 1), sms("+12065550002", 2), sms("+12065550001", 3)], datetime.now(UTC)
        )
        assert created[0] == created[2] != created[1]
        assert minted == {created[0], created[1]}  # what ingest flags as new_customer
        assert "find" not in commands.names  # new addresses: one insert, no reads

        # Another replica (an empty cache): the insert meets the stored identities, which win.
        commands.names.clear()
        again = await IdentityDirectory(db).resolve([sms("+12065550002", 4), sms("+12065550001", 5)], datetime.now(UTC))
        assert again == [created[1], created[0]]
        assert "find" in commands.names
        # A linking message still joins the app account to the phone's customer.
        linked, minted = await IdentityDirectory(db).resolve_batch([app("acct-1", "+12065550001")], datetime.now(UTC))
        assert linked == [created[0]] and minted == set()
        # An app account with a phone nobody knows: one new customer for both identities.
        fresh, minted = await IdentityDirectory(db).resolve_batch([app("acct-2", "+12065550003")], datetime.now(UTC))
        assert minted == {fresh[0]}
        assert await db["identities"].count_documents({}) == 5
    finally:
        await client.close()


async def test_known_heads_are_not_read_again_and_apply_returns_them(infra, mongo_db_name) -> None:
    commands = Commands()
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True, event_listeners=[commands])
    try:
        store = DeadlineStore(client[mongo_db_name])
        now = datetime.now(UTC)
        first = Arm("response", "conv-9", now + timedelta(minutes=5), "0001", {})
        second = Arm("response", "conv-9", now + timedelta(minutes=9), "0002", {})
        heads = await store.apply({("response", "conv-9"): first}, now, {"response:conv-9": NO_HEAD})
        assert heads == {"response:conv-9": Head(first.doc_id, first.due_at)}
        assert "find" not in commands.names  # a head known to be absent is not read
        heads = await store.apply({("response", "conv-9"): second}, now, heads)
        assert "find" not in commands.names
        assert sorted([d["_id"] async for d in store.deadlines.find({"entity": "conv-9"})]) == [second.doc_id]
        assert await store.existing("response", ["conv-9"], now, heads) == {"conv-9"}
        assert await store.existing("response", ["conv-9"], now) == {"conv-9"}  # read from the store: the same
    finally:
        await client.close()


async def test_an_arming_not_due_yet_is_running_without_a_read_and_a_due_one_is_read(infra, mongo_db_name) -> None:
    commands = Commands()
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True, event_listeners=[commands])
    try:
        store = DeadlineStore(client[mongo_db_name])
        now = datetime.now(UTC)
        arm = Arm("response", "conv-5", now + timedelta(minutes=5), "0001", {})
        heads = await store.apply({("response", "conv-5"): arm}, now, {"response:conv-5": NO_HEAD})
        commands.names.clear()
        assert await store.existing("response", ["conv-5"], now, heads) == {"conv-5"}
        assert "find" not in commands.names  # due in 5 minutes: no sweeper can have fired it
        # Within the clock skew of its due time, or past it, the arming itself is read.
        assert await store.existing("response", ["conv-5"], arm.due_at - CLOCK_SKEW / 2, heads) == {"conv-5"}
        assert commands.names.count("find") == 1
        await store.done([arm.doc_id])  # fired
        assert await store.existing("response", ["conv-5"], arm.due_at, heads) == set()
        # A head stored before heads carried the due time: the arming is read.
        await store.heads.replace_one({"_id": "response:conv-5"}, {"current": arm.doc_id})
        commands.names.clear()
        assert await store.existing("response", ["conv-5"], now) == set()
        assert commands.names.count("find") == 2  # the head, then the arming it names
    finally:
        await client.close()


async def test_a_new_head_is_inserted_and_one_that_exists_after_all_is_replaced(infra, mongo_db_name) -> None:
    writes = Writes()
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True, event_listeners=[writes])
    try:
        store = DeadlineStore(client[mongo_db_name])
        now = datetime.now(UTC)
        first = Arm("response", "conv-7", now + timedelta(minutes=5), "0001", {})
        again = Arm("response", "conv-7", now + timedelta(minutes=5), "0002", {})
        await store.apply({("response", "conv-7"): first}, now)
        assert "response:conv-7" in writes.inserts and "response:conv-7" not in writes.updates
        # Believed absent (e.g. a replay that rebuilt its state as new) but stored: replaced.
        await store.apply({("response", "conv-7"): again}, now, {"response:conv-7": NO_HEAD})
        assert writes.updates.count("response:conv-7") == 1
        assert (await store.heads.find_one({"_id": "response:conv-7"}))["current"] == again.doc_id
        # ... and the arming it named before is gone: only the current one can fire.
        assert sorted([d["_id"] async for d in store.deadlines.find({"entity": "conv-7"})]) == [again.doc_id]
    finally:
        await client.close()


async def test_metrics_counts_event_ids_insert_first_and_tells_a_repeat_by_its_position(infra, mongo_db_name) -> None:
    from services.metrics.store import KpiStore

    commands = Commands()
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True, event_listeners=[commands])
    day1, day2 = datetime(2026, 11, 23, 23, 59, tzinfo=UTC), datetime(2026, 11, 24, 0, 1, tzinfo=UTC)
    try:
        store = KpiStore(client[mongo_db_name])
        assert await store.repeated_events([("e1", "events/0/1", day1), ("e2", "events/0/2", day1), ("e3", "events/0/3", day2)]) == set()
        assert "find" not in commands.names  # new events: one insert per day, no reads
        assert sorted(n for n in await client[mongo_db_name].list_collection_names() if n.startswith("kpi_counted_")) == [
            "kpi_counted_20261123",
            "kpi_counted_20261124",
        ]
        # Read again where they were first read (a replay of the same records): not repeats.
        # Published again (same id, another record): a repeat, in the collection of its own day.
        assert await store.repeated_events([("e1", "events/0/1", day1), ("e2", "events/0/9", day1), ("e3", "events/1/3", day2), ("e4", "events/0/10", day1)]) == {"e2", "e3"}
    finally:
        await client.close()


async def test_metrics_drops_counted_events_of_days_long_past(infra, mongo_db_name) -> None:
    from services.metrics.store import COUNTED_EVENT_DAYS, KpiStore

    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True)
    now = datetime(2026, 11, 23, 12, tzinfo=UTC)
    try:
        store = KpiStore(client[mongo_db_name])
        for days in (0, COUNTED_EVENT_DAYS, COUNTED_EVENT_DAYS + 1, 30):
            await store.repeated_events([(f"e{days}", "events/0/1", now - timedelta(days=days))])
        dropped = await store.drop_counted_events_before(now)
        assert dropped == ["kpi_counted_20261024", "kpi_counted_20261114"]
        kept = sorted(n for n in await client[mongo_db_name].list_collection_names() if n.startswith("kpi_counted_"))
        assert kept == ["kpi_counted_20261115", "kpi_counted_20261123"]
    finally:
        await client.close()


async def test_metrics_claims_new_buckets_insert_first_and_keeps_stored_counters(infra, mongo_db_name) -> None:
    from services.metrics.store import KpiStore, agent_counters, bucket_doc, empty_bucket

    commands = Commands()
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True, event_listeners=[commands])
    try:
        store = KpiStore(client[mongo_db_name])
        hour = datetime(2026, 11, 23, 12, tzinfo=UTC)
        docs = await store.claim_or_load_buckets({"b-pnw": empty_bucket("b-pnw", hour, "pnw", "w/0")})
        assert docs["b-pnw"]["agents"] == {} and "find" not in commands.names
        docs["b-pnw"]["agents"]["ana"] = {"messages": 3}
        docs["b-pnw"]["agents"]["ben"] = {"messages": 1, "turns": 1}
        docs["b-pnw"]["applied_offset"] = 41
        await store.save_buckets([bucket_doc(d) for d in docs.values()])
        again = await store.claim_or_load_buckets(
            {"b-pnw": empty_bucket("b-pnw", hour, "pnw", "w/0"), "b-sw": empty_bucket("b-sw", hour, "pnw", "w/1")}
        )
        assert again["b-pnw"]["agents"] == {"ana": {"messages": 3}, "ben": {"messages": 1, "turns": 1}}
        assert again["b-pnw"]["applied_offset"] == 41 and again["b-sw"]["agents"] == {}
        # Stored compact: the queried fields beside one blob (FerretDB re-encodes every field
        # of a replaced document).
        raw = await store.buckets.find_one({"_id": "b-pnw"})
        assert set(raw) == {"_id", "hour", "team", "writer", "format", "blob"}
        # A bucket stored per agent (before buckets were per team), and one per team stored as
        # fields (before 2026-12-05), are still read.
        await store.buckets.insert_one({"_id": "old", "hour": hour, "team": "pnw", "agent": "cy", "writer": "w/2", "counters": {"messages": 2}, "applied_offset": 5})
        fields = {"_id": "fields", "hour": hour, "team": "pnw", "writer": "w/3", "agents": [{"agent": "dee", "counters": {"turns": 4}}], "applied_offset": 9}
        await store.buckets.insert_one(fields)
        stored = await store.buckets_between(hour, hour + timedelta(hours=1), "pnw")
        assert sorted(a for d in stored for a, c in agent_counters(d) if c) == ["ana", "ben", "cy", "dee"]
        loaded = await store.load_buckets(["fields", "b-pnw"])
        assert loaded["fields"]["agents"] == {"dee": {"turns": 4}} and loaded["fields"]["applied_offset"] == 9
        assert loaded["b-pnw"]["agents"] == again["b-pnw"]["agents"] and loaded["b-pnw"]["hour"] == hour
    finally:
        await client.close()


async def test_team_routing_rewrites_only_a_small_pool_document_and_inserts_its_changed_placements(infra, mongo_db_name) -> None:
    """A flush replaces the pool's small document and inserts the placements that changed;
    the snapshot is inserted too (never replaced), the ones it supersedes are deleted; a
    write that failed after storing its placements is followed by a snapshot past them; what
    is loaded is what was handled."""
    from dataclasses import replace

    from services.team_routing.pool import Placement, PoolState
    from services.team_routing.store import PlacementLog, PoolStore, capture
    from shared.contracts.common import RoutingReason, WaitingOn
    from tests.support import StoreWrites

    writes = StoreWrites()
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True, event_listeners=[writes])
    T = datetime(2026, 12, 4, 9, tzinfo=UTC)
    waiting = Placement(conversation_id="c-0", customer_id="cus-0", agent_id=None, waiting_on=WaitingOn.AGENT, priority=0, enqueued_at=T, pool_reason=RoutingReason.HOME_TEAM)
    try:
        store = PoolStore(client[mongo_db_name])
        state = PoolState(pool_id="pnw", placements={f"c-{n}": replace(waiting, conversation_id=f"c-{n}") for n in range(50)})
        log = PlacementLog()
        for step in range(3):
            if step:
                state.placements[f"c-{step}"].agent_id = "a-1"
            write = capture(state, log)
            await store.save([write])
            log = write.after
        assert writes.inserted("pool_placements") == ["pnw|1", "pnw|2", "pnw|3"]  # a snapshot, then changes
        assert writes.replaced("pool_placements") == [] and writes.replaced("pools") == ["pnw"] * 3

        # The pool document was not replaced (the store failed after the placements): the next
        # write is a snapshot past them, and they are deleted with the older ones.
        state.placements["c-9"].priority = 3
        tried = capture(state, log)
        await client[mongo_db_name]["pool_placements"].insert_one(tried.placements)
        write = capture(state, log.failed())
        await store.save([write])
        assert write.after.start == write.after.to == 5
        assert sorted([d["_id"] async for d in client[mongo_db_name]["pool_placements"].find({})]) == ["pnw|5"]

        loaded, loaded_log = (await store.load(["pnw", "std"]))["pnw"]
        assert loaded == state and capture(loaded, loaded_log).placements is None
        assert (await store.load(["std"]))["std"][0] == PoolState(pool_id="std")  # never stored: empty
    finally:
        await client.close()
