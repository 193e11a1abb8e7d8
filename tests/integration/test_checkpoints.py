"""Write-behind with checkpoints on the real broker and store: state handled in memory but
not stored when a consumer dies is rebuilt by replaying from the last checkpoint, whatever
offsets the group committed; nothing is counted twice and nothing is lost."""

from __future__ import annotations

import asyncio
from collections import Counter

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pymongo import AsyncMongoClient, ReplaceOne

from shared.runtime.checkpoints import Checkpointed
from shared.runtime.store import find_by_ids
from tests.support import eventually

KEYS = ("a", "b", "c")


class Counts:
    """A toy single-writer state: records per key, stored as ``{_id: key, n, applied}``."""

    def __init__(self, db) -> None:  # type: ignore[no-untyped-def]
        self.docs = db["counts"]
        self.memory: dict[str, dict] = {}
        self.fail_store = False
        self.seen = 0

    async def handle(self, records) -> None:  # type: ignore[no-untyped-def]
        self.seen += len(records)
        missing = [r.key.decode() for r in records if r.key.decode() not in self.memory]
        stored = await find_by_ids(self.docs, missing)
        for key in missing:
            self.memory[key] = stored.get(key, {"_id": key, "n": 0, "applied": -1})
        for r in records:
            doc = self.memory[r.key.decode()]
            if r.offset > doc["applied"]:  # the stored state may be ahead of the checkpoint
                doc["n"] += 1
                doc["applied"] = r.offset

    def snapshot(self):  # type: ignore[no-untyped-def]
        captured = [dict(d) for d in self.memory.values()]

        async def write() -> None:
            if self.fail_store:
                raise RuntimeError("store unavailable")
            if captured:
                await self.docs.bulk_write([ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in captured])

        return write

    def drop(self) -> None:
        self.memory.clear()


async def subscribed(infra, topic: str, group: str, counts: Counts, db, interval_s: float) -> tuple[AIOKafkaConsumer, Checkpointed]:  # type: ignore[no-untyped-def]
    """A started group consumer of ``topic`` with its ``Checkpointed`` over ``counts``."""
    consumer = AIOKafkaConsumer(bootstrap_servers=infra.kafka, group_id=group, enable_auto_commit=False, auto_offset_reset="earliest")
    owner = Checkpointed(db["checkpoints"], counts.snapshot, counts.drop, interval_s, consumer=lambda: consumer)
    consumer.subscribe([topic], listener=owner.rebalance_listener())
    await consumer.start()
    return consumer, owner


async def produce(infra, topic: str, count: int) -> Counter:  # type: ignore[no-untyped-def]
    """``count`` records to partition 0, keyed a, b, c in turn; how many per key."""
    producer = AIOKafkaProducer(bootstrap_servers=infra.kafka, acks="all", enable_idempotence=True)
    await producer.start()
    sent: Counter = Counter()
    try:
        for i in range(count):
            key = KEYS[i % 3]
            await producer.send_and_wait(topic, b"x", key=key.encode(), partition=0)
            sent[key] += 1
    finally:
        await producer.stop()
    return sent


async def consume(infra, topic: str, group: str, counts: Counts, db, until: int, interval_s: float, last_flush: bool = True) -> Checkpointed:  # type: ignore[no-untyped-def]
    consumer, owner = await subscribed(infra, topic, group, counts, db, interval_s)
    counts.seen = 0
    try:
        while counts.seen < until:
            batch = await consumer.getmany(timeout_ms=500, max_records=7)
            for records in batch.values():
                await owner.run_batch(records, counts.handle)
                await consumer.commit()  # the group's committed offsets run ahead of the checkpoints
        await owner.settle()
        if last_flush:  # a write may have been skipped while the previous one ran
            async with owner.lock:
                owner.flush()
            await owner.settle()
    finally:
        counts.fail_store = True  # dying: nothing more reaches the store (no flush on leave)
        await consumer.stop()
    return owner


async def test_a_consumer_that_dies_between_checkpoints_is_replayed_from_the_last_one(infra, topic_prefix, mongo_db_name) -> None:
    topic = f"{topic_prefix}routing.commands.v1"  # any topic of the fixture's; partition 0 only
    sent = await produce(infra, topic, 60)

    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True)
    db = client[mongo_db_name]
    group = f"{topic_prefix}group"
    try:
        # First life: stores and checkpoints after every batch, then dies. Second life: never
        # stores (interval too long) and dies with what it handled only in memory.
        first = Counts(db)
        owner = await consume(infra, topic, group, first, db, until=21, interval_s=0.0)
        checkpoint = await db["checkpoints"].find_one({"_id": f"{topic}/0"})
        assert checkpoint is not None, owner.handled
        covered = checkpoint["offset"] + 1  # records 0..offset are in the stored counts
        assert sum([d["n"] async for d in db["counts"].find({})]) == covered
        first.fail_store = False
        await consume(infra, topic, group, first, db, until=21, interval_s=3600.0, last_flush=False)
        # The second life stored nothing, though the group committed what it consumed.
        assert sum([d["n"] async for d in db["counts"].find({})]) == covered
        assert await db["checkpoints"].find_one({"_id": f"{topic}/0"}) == checkpoint

        # Second life: seeks back to the checkpoint, replays, and stores every record once.
        second = Counts(db)
        consumer_task = asyncio.create_task(consume(infra, topic, group, second, db, until=60 - covered, interval_s=0.0))

        async def all_counted() -> bool:
            return {d["_id"]: d["n"] async for d in db["counts"].find({})} == dict(sent)

        await eventually(all_counted, timeout_s=60, what="every record counted exactly once")
        await consumer_task
    finally:
        await client.close()


async def test_checkpoint_metrics_show_what_a_crash_would_replay_and_failed_stores(mongo_db_name, infra) -> None:
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from shared.runtime.checkpoints import CheckpointMetrics

    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True)
    db = client[mongo_db_name]
    registry = CollectorRegistry()
    state = Counts(db)
    owner = Checkpointed(db["checkpoints"], state.snapshot, state.drop, 0.0, consumer=lambda: None, metrics=CheckpointMetrics(registry, "counts"))

    def sample(name: str) -> float:
        value = registry.get_sample_value(name, {"state": "counts"})
        assert value is not None, name
        return value

    def records(partition: int, offsets: range) -> list[SimpleNamespace]:
        return [SimpleNamespace(topic="t", partition=partition, offset=o, key=b"a") for o in offsets]

    try:
        started = sample("hometeam_state_stored_timestamp_seconds")
        owner.note(records(0, range(10, 15)))  # five records of partition 0, first at offset 10
        owner.note(records(1, range(0, 3)))
        assert sample("hometeam_state_unstored_records") == 8
        await asyncio.sleep(0.01)
        async with owner.lock:
            owner.flush()
        await owner.settle()
        assert sample("hometeam_state_unstored_records") == 0
        assert sample("hometeam_state_stored_timestamp_seconds") > started
        stored_at = sample("hometeam_state_stored_timestamp_seconds")

        state.fail_store = True
        owner.note(records(0, range(15, 17)))
        async with owner.lock:
            owner.flush()
        await owner.settle()
        assert sample("hometeam_state_store_failures_total") == 1
        assert sample("hometeam_state_unstored_records") == 2
        assert sample("hometeam_state_stored_timestamp_seconds") == stored_at

        owner.rewind(())
        assert sample("hometeam_state_rewinds_total") == 1
        assert sample("hometeam_state_unstored_records") == 0
        # A second state of the same service shares the families.
        CheckpointMetrics(registry, "other").rewinds.inc()
        assert registry.get_sample_value("hometeam_state_rewinds_total", {"state": "other"}) == 1
    finally:
        await client.close()


async def test_a_partition_with_nothing_new_after_a_crash_is_still_replayed(infra, topic_prefix, mongo_db_name) -> None:
    """The group committed everything, nothing was stored, and no record comes after the
    restart: the replay must not wait for new input (team-routing after a kill -9 once the
    customers had stopped writing)."""
    topic = f"{topic_prefix}routing.commands.v1"
    await produce(infra, topic, 12)
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True)
    db = client[mongo_db_name]
    group = f"{topic_prefix}idle"
    try:
        # First life: handles all 12 in memory, stores nothing, the group commits all 12.
        await consume(infra, topic, group, Counts(db), db, until=12, interval_s=3600.0, last_flush=False)
        assert await db["counts"].count_documents({}) == 0

        second = Counts(db)
        consumer, owner = await subscribed(infra, topic, group, second, db, 0.0)
        try:
            async def replayed() -> bool:
                batch = await consumer.getmany(timeout_ms=200, max_records=7)
                for records in batch.values():
                    await owner.run_batch(records, second.handle)
                    await consumer.commit()
                if not batch:
                    await owner.resume_unverified()  # what the service's background loop does
                await owner.settle()
                return sum([d["n"] async for d in db["counts"].find({})]) == 12

            await eventually(replayed, timeout_s=30, what="the 12 records replayed and stored")
        finally:
            await consumer.stop()
    finally:
        await client.close()
