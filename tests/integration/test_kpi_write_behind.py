"""The metrics service's customer KPI state and hourly buckets are stored behind checkpoints,
against the real store: nothing is written per batch, a flush writes each changed document
once, a failed write is retried with everything it held, and a replay after a rewind counts
nothing twice, neither in the store nor in the process's Prometheus metrics."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient

from shared.contracts import conversations as ev
from shared.contracts.common import Channel, Direction, PoolKind, RoutingReason
from shared.contracts.envelope import new_envelope
from shared.contracts.registry import CONVERSATION_EVENTS, SURVEY_RESPONSES
from shared.runtime.decoding import BatchReader
from shared.runtime.dead_letter import DeadLetters

from services.metrics.handlers import EventsConsumer
from services.metrics.prom import KpiMetrics
from services.metrics.store import KpiStore, agent_counters
from tests.support import StoreWrites

pytestmark = pytest.mark.integration

T = datetime(2026, 11, 23, 9, tzinfo=UTC)
TOPIC = CONVERSATION_EVENTS.name


def record(offset: int, data: Any, customer: str, event_id: str | None = None) -> ConsumerRecord:
    value = new_envelope(data, subject=customer, source="/test", time=T, id=event_id).model_dump_json().encode()
    return ConsumerRecord(TOPIC, 0, offset, 0, 0, customer.encode(), value, None, len(customer), len(value), [])


def conversation(customer: str, conv: str, first: int) -> list[ConsumerRecord]:
    """Opened, one inbound line, assigned to agent k-1 of team kpi: offsets first .. first+2."""
    return [
        record(first, ev.ConversationOpened(conversation_id=conv, customer_id=customer, home_team_id="kpi", channel=Channel.SMS, opened_at=T), customer),
        record(
            first + 1,
            ev.MessageAdded(conversation_id=conv, customer_id=customer, message_id=f"m-{conv}", direction=Direction.INBOUND, channel=Channel.SMS, at=T),
            customer,
        ),
        record(
            first + 2,
            ev.ConversationAssigned(
                conversation_id=conv,
                customer_id=customer,
                pool=PoolKind.HOME_TEAM,
                team_id="kpi",
                agent_id="k-1",
                reason=RoutingReason.HOME_TEAM,
                pool_reason=RoutingReason.HOME_TEAM,
                at=T + timedelta(seconds=5),
            ),
            customer,
        ),
    ]


def messages_counted(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("hometeam_messages_total", {"team": "kpi", "direction": "inbound", "channel": "sms"}) or 0.0


async def stored_messages(store: KpiStore) -> float:
    buckets = await store.buckets_between(T, T + timedelta(hours=1), "kpi")
    return sum(c.get("messages", 0) for b in buckets for _, c in agent_counters(b))


@pytest.fixture
async def kpis(infra, mongo_db_name):
    writes = StoreWrites()
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True, event_listeners=[writes])
    registry = CollectorRegistry()
    store = KpiStore(client[mongo_db_name])
    reader = BatchReader((CONVERSATION_EVENTS, SURVEY_RESPONSES), DeadLetters(None, "metrics", registry))  # type: ignore[arg-type]
    consumer = EventsConsumer(reader, store, KpiMetrics(registry), max_clean=1)
    try:
        yield consumer, store, writes, registry
    finally:
        await client.close()


async def test_state_is_written_once_per_flush_not_per_batch(kpis) -> None:
    consumer, store, writes, registry = kpis
    first = conversation("cus_a", "conv-a", 0)
    for batch in ([first[0]], [first[1]], [first[2]]):  # three batches touch the same customer
        await consumer.handle(batch)
    assert writes.of("kpi_customers") == [] and writes.replaced("kpi_buckets") == []
    assert messages_counted(registry) == 1.0  # Prometheus moves at once

    write = consumer.snapshot_state()
    assert write is not None
    await write()
    # A new customer's state is inserted when first stored (its claim is a document apart) ...
    assert writes.inserted("kpi_customer_claims") == ["cus_a"]
    assert writes.of("kpi_customers") == [("insert", "cus_a")]
    assert writes.replaced("kpi_buckets") == ["2026-11-23T09|kpi|conversations_events_v1/0"]  # one per team and hour
    (bucket,) = await store.buckets_between(T, T + timedelta(hours=1), "kpi")
    assert {agent for agent, _ in agent_counters(bucket)} == {"-", "k-1"}  # the line came before the assignment
    assert await stored_messages(store) == 1
    assert consumer.snapshot_state() is None  # nothing changed since
    # ... and replaced when it changes later.
    await consumer.handle([record(3, ev.ConversationResolved(conversation_id="conv-a", customer_id="cus_a", resolved_at=T + timedelta(minutes=1)), "cus_a")])
    write = consumer.snapshot_state()
    assert write is not None
    await write()
    assert writes.of("kpi_customers") == [("insert", "cus_a"), ("update", "cus_a")]
    assert writes.inserted("kpi_customer_claims") == ["cus_a"]

async def test_a_failed_write_is_retried_with_everything_it_held(kpis, monkeypatch) -> None:
    consumer, store, writes, registry = kpis
    await consumer.handle(conversation("cus_a", "conv-a", 0))
    write = consumer.snapshot_state()
    assert write is not None

    async def down(docs: Any) -> None:
        raise ConnectionError("store unreachable")

    monkeypatch.setattr(store, "save_buckets", down)
    with pytest.raises(ConnectionError):
        await write()
    monkeypatch.undo()
    # Meanwhile another customer arrives; with max_clean=1 nothing unstored may be forgotten.
    await consumer.handle(conversation("cus_b", "conv-b", 3))
    write = consumer.snapshot_state()
    assert write is not None
    await write()
    assert sorted(writes.inserted("kpi_customers")) == ["cus_a", "cus_b"]
    assert await stored_messages(store) == 2
    assert len(consumer.customers) <= 2


async def test_a_replay_after_a_rewind_counts_nothing_twice(kpis) -> None:
    consumer, store, writes, registry = kpis
    records = conversation("cus_a", "conv-a", 0) + conversation("cus_b", "conv-b", 3)
    await consumer.handle(records[:3])
    write = consumer.snapshot_state()  # cus_a stored; cus_b's records come after
    assert write is not None
    await write()
    await consumer.handle(records[3:])
    assert messages_counted(registry) == 2.0

    consumer.drop_state()  # a rebalance or failed batch: replay everything from offset 0
    await consumer.handle(records)
    write = consumer.snapshot_state()
    assert write is not None
    await write()
    assert await stored_messages(store) == 2  # cus_a's line was stored once, cus_b's now
    assert messages_counted(registry) == 2.0  # and the process counted each once
    # cus_a's stored state had applied all of its records (read, not written again); cus_b's
    # was never stored (claimed before the rewind, found claimed again, inserted).
    assert writes.of("kpi_customers") == [("insert", "cus_a"), ("insert", "cus_b")]


async def test_an_event_published_again_is_counted_once(kpis) -> None:
    """conversation-state repeats a batch's outputs (same ids, new records) after a crash."""
    consumer, store, writes, registry = kpis
    line = ev.MessageAdded(conversation_id="conv-a", customer_id="cus_a", message_id="m-1", direction=Direction.INBOUND, channel=Channel.SMS, at=T)
    first = conversation("cus_a", "conv-a", 0)
    await consumer.handle(first + [record(3, line, "cus_a", event_id="evt-line-2")])
    await consumer.handle([record(4, line, "cus_a", event_id="evt-line-2")])  # the same event again
    consumer.drop_state()  # and once more after a rewind, from the store
    write = consumer.snapshot_state()
    assert write is None  # dropped: nothing to store
    await consumer.handle(first + [record(3, line, "cus_a", event_id="evt-line-2"), record(4, line, "cus_a", event_id="evt-line-2")])
    write = consumer.snapshot_state()
    assert write is not None
    await write()
    assert messages_counted(registry) == 2.0  # two distinct lines
    assert await stored_messages(store) == 2
