"""The metrics service's hourly buckets and conversation credits are stored behind
checkpoints, against the real store: a batch writes only its events' ids (one insert), a flush
writes each changed document once, a failed write is retried with everything it held, and a
replay after a rewind or an event published again counts nothing twice, neither in the store
nor in the process's Prometheus metrics. Nothing is kept per customer."""

from __future__ import annotations

import json
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
from shared.contracts.surveys import SurveyAnswered
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
    """Opened, one inbound line (of a conversation queued for team kpi), assigned to agent
    k-1 of team kpi: offsets first .. first+2."""
    return [
        record(first, ev.ConversationOpened(conversation_id=conv, customer_id=customer, home_team_id="kpi", channel=Channel.SMS, opened_at=T), customer),
        record(
            first + 1,
            ev.MessageAdded(
                conversation_id=conv, customer_id=customer, message_id=f"m-{conv}", direction=Direction.INBOUND, channel=Channel.SMS,
                team_id="kpi", at=T, starts_turn=True,
            ),
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
                home_team_id="kpi",
                first_placement=True,
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


async def test_a_batch_writes_its_event_ids_and_a_flush_each_changed_document_once(kpis) -> None:
    consumer, store, writes, registry = kpis
    first = conversation("cus_a", "conv-a", 0)
    for batch in ([first[0]], [first[1]], [first[2]]):  # three batches touch the same team's bucket
        await consumer.handle(batch)
    counted = {(c, i) for cmd, c, i in writes.ops if cmd == "insert" and c.startswith("kpi_counted_")}
    # One small insert per event that counts, in the collection of its day; the opening (no
    # fact, no credit: reading it again changes nothing) is not recorded.
    line_id, assigned_id = (json.loads(r.value)["id"] for r in first[1:])
    assert counted == {("kpi_counted_20261123", line_id), ("kpi_counted_20261123", assigned_id)}
    assert writes.replaced("kpi_buckets") == [] and writes.of("kpi_conversation_credits") == []
    assert messages_counted(registry) == 1.0  # Prometheus moves at once
    assert not any(c in ("kpi_customers", "kpi_customer_claims") for _, c, _ in writes.ops)  # nothing per customer

    write = consumer.snapshot_state()
    assert write is not None
    await write()
    assert writes.replaced("kpi_buckets") == ["2026-11-23T09|kpi|conversations_events_v1/0"]  # one per team and hour
    (bucket,) = await store.buckets_between(T, T + timedelta(hours=1), "kpi")
    assert {agent for agent, _ in agent_counters(bucket)} == {"-"}  # line and routing before any agent
    assert await stored_messages(store) == 1
    assert consumer.snapshot_state() is None  # nothing changed since
    # A conversation's end stores who ended it (for its survey answers), once.
    await consumer.handle([record(3, ev.ConversationResolved(conversation_id="conv-a", customer_id="cus_a", team_id="kpi", agent_id="k-1", resolved_at=T + timedelta(minutes=1)), "cus_a")])
    write = consumer.snapshot_state()
    assert write is not None
    await write()
    assert writes.of("kpi_conversation_credits") == [("insert", "conv-a")]
    assert await store.load_credits(["conv-a"]) == {"conv-a": ("kpi", "k-1")}


async def test_a_failed_write_is_retried_with_everything_it_held(kpis, monkeypatch) -> None:
    consumer, store, writes, registry = kpis
    await consumer.handle(conversation("cus_a", "conv-a", 0))
    await consumer.handle([record(3, ev.ConversationClosed(conversation_id="conv-a", customer_id="cus_a", team_id="kpi", closed_at=T), "cus_a")])
    write = consumer.snapshot_state()
    assert write is not None

    async def down(docs: Any) -> None:
        raise ConnectionError("store unreachable")

    monkeypatch.setattr(store, "save_buckets", down)
    with pytest.raises(ConnectionError):
        await write()
    monkeypatch.undo()
    # Meanwhile another conversation arrives; with max_clean=1 nothing unstored may be forgotten.
    await consumer.handle(conversation("cus_b", "conv-b", 4))
    write = consumer.snapshot_state()
    assert write is not None
    await write()
    assert await stored_messages(store) == 2
    assert await store.load_credits(["conv-a"]) == {"conv-a": ("kpi", "-")}
    assert len(consumer.buckets) <= 1


async def test_a_replay_after_a_rewind_counts_nothing_twice(kpis) -> None:
    consumer, store, writes, registry = kpis
    records = conversation("cus_a", "conv-a", 0) + conversation("cus_b", "conv-b", 3)
    await consumer.handle(records[:3])
    write = consumer.snapshot_state()  # cus_a's records stored; cus_b's come after
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


async def test_an_event_published_again_is_counted_once(kpis, infra, mongo_db_name) -> None:
    """conversation-state repeats a batch's outputs (same ids, new records) after a crash."""
    consumer, store, writes, registry = kpis
    line = ev.MessageAdded(conversation_id="conv-a", customer_id="cus_a", message_id="m-1", direction=Direction.INBOUND, channel=Channel.SMS, team_id="kpi", at=T)
    first = conversation("cus_a", "conv-a", 0)
    await consumer.handle(first + [record(3, line, "cus_a", event_id="evt-line-2")])
    await consumer.handle([record(4, line, "cus_a", event_id="evt-line-2")])  # the same event again
    consumer.drop_state()  # and once more after a rewind
    assert consumer.snapshot_state() is None  # dropped: nothing to store
    await consumer.handle(first + [record(3, line, "cus_a", event_id="evt-line-2"), record(4, line, "cus_a", event_id="evt-line-2")])
    write = consumer.snapshot_state()
    assert write is not None
    await write()
    assert messages_counted(registry) == 2.0  # two distinct lines
    assert await stored_messages(store) == 2

    # A new process (the metrics service restarted) replays from its checkpoint, here from
    # offset 3: the original is its own record again (counted: its bucket says so), the
    # repeat is not.
    fresh_registry = CollectorRegistry()
    reader = BatchReader((CONVERSATION_EVENTS, SURVEY_RESPONSES), DeadLetters(None, "metrics", fresh_registry))  # type: ignore[arg-type]
    restarted = EventsConsumer(reader, store, KpiMetrics(fresh_registry), max_clean=1)
    await restarted.handle([record(3, line, "cus_a", event_id="evt-line-2"), record(4, line, "cus_a", event_id="evt-line-2")])
    write = restarted.snapshot_state()
    assert write is None  # the bucket already holds offset 3; offset 4 is a repeat
    assert messages_counted(fresh_registry) == 0.0
    assert await stored_messages(store) == 2


async def test_a_survey_answer_is_credited_to_whoever_ended_its_conversation(kpis) -> None:
    consumer, store, writes, registry = kpis
    await consumer.handle(conversation("cus_a", "conv-a", 0))
    await consumer.handle([record(3, ev.ConversationResolved(conversation_id="conv-a", customer_id="cus_a", team_id="kpi", agent_id="k-1", resolved_at=T), "cus_a")])
    write = consumer.snapshot_state()
    assert write is not None
    await write()
    consumer.drop_state()  # forgotten in memory: read from the store

    survey = SurveyAnswered(survey_id="s-1", customer_id="cus_a", conversation_id="conv-a", score=5, answered_at=T + timedelta(minutes=3))
    value = new_envelope(survey, subject="cus_a", source="/test", time=T).model_dump_json().encode()
    await consumer.handle([ConsumerRecord(SURVEY_RESPONSES.name, 0, 0, 0, 0, b"cus_a", value, None, 5, len(value), [])])

    assert registry.get_sample_value("hometeam_csat_responses_total", {"team": "kpi", "score": "5"}) == 1.0
