"""conversation-state journals a batch's outputs before it publishes them (a transactional
outbox), against the real broker and the real store: whichever step of a batch fails, the
customer's conversation events on Kafka carry each event under one sequence number, number
no two events alike and skip none, even when the batch comes again mixed differently or cut
short (a fetch after a rewind is not the same fetch), the journaled state agrees with them, and
the transcript holds every message (lines that failed to store after the entry was in are
stored from it: an earlier take of this change lost them). The lines are stored by the write
behind since session 29: one that fails, or a process that stops or drops its memory before
it, leaves them in the journal, and they are stored from there (the last three tests).

Before the change the outputs went out first and the journal after them: a journal that
failed left published events the state did not know of, and the retried batch numbered a new
event with a number an earlier one was published under, or applied a record again under a new
number (three of the four failing steps below failed the test)."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from types import SimpleNamespace
from datetime import UTC, datetime, timedelta
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaTimeoutError
from opentelemetry.trace import NoOpTracer
from prometheus_client import CollectorRegistry, Counter
from pymongo import AsyncMongoClient

from services.conversation_state.app import INPUTS
from services.conversation_state.handlers import ConversationConsumer
from services.conversation_state.lifecycle import Rules
from services.conversation_state.model import Line
from services.conversation_state.store import ConversationStore, entry_contents
from services.conversation_state.write_behind import JournaledCustomers
from shared.contracts.common import Channel, Direction
from shared.contracts.customers import OptOutOfHomeTeam
from shared.contracts.envelope import new_envelope
from shared.contracts.messages import CustomerMessageReceived
from shared.contracts.registry import CONVERSATION_EVENTS, CUSTOMER_COMMANDS, MESSAGES_RECEIVED
from shared.runtime.dead_letter import DeadLetters
from shared.runtime.decoding import BatchReader
from shared.runtime.kafka import build_producer
from shared.runtime.outbox import Outbox, Publisher
from shared.runtime.tracing import RecordTracer
from shared.settings import ServiceSettings
from shared.teams import parse_directory
from tests.support import KafkaProbe, StoreWrites

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 2, 17, 0, tzinfo=UTC)  # a Monday, within the team's hours
CUSTOMER = "cus_outbox"
DIRECTORY = parse_directory(
    {
        "default_team": "pnw",
        "standard_pool": {"agents": [{"id": "std-avery", "max_concurrency": 8}]},
        "teams": [
            {
                "id": "pnw",
                "name": "Pacific Northwest",
                "timezone": "America/Los_Angeles",
                "regions": {"zip_prefixes": ["980"], "area_codes": ["206"], "markets": ["seattle"]},
                "hours": {"mon": ["08:00-20:00"]},
                "agents": [{"id": "sea-ana", "max_concurrency": 6}],
            }
        ],
    }
)


class FailsOnce:
    """``target`` with its method ``name`` failing once, at its ``at``-th call (from 1)."""

    def __init__(self, target: Any, name: str, at: int = 1) -> None:
        self._target, self._name, self.at = target, name, at
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name != self._name:
            return attr

        async def maybe_failing(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if not self.fails(self.calls):
                return await attr(*args, **kwargs)
            raise ConnectionError(f"{name} failed (injected)")

        return maybe_failing

    def fails(self, call: int) -> bool:
        return call == self.at


class FailingSender:
    """The publisher, its ``at``-th ``send_batches`` (from 1) failing: after handing Kafka only
    the first record (``acknowledgement`` False: the others never go), or all of them with
    Kafka's acknowledgement reporting a failure (True: every record may be out)."""

    def __init__(self, publisher: Publisher, acknowledgement: bool, at: int = 1) -> None:
        self._publisher, self._acknowledgement, self.at = publisher, acknowledgement, at
        self.calls = 0

    def traced(self, topic: str, headers: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        return self._publisher.traced(topic, headers)

    async def send_batches(self, records: list[Any]) -> list[asyncio.Future[Any]]:
        self.calls += 1
        if self.calls != self.at:
            return await self._publisher.send_batches(records)
        if not self._acknowledgement:
            await asyncio.gather(*await self._publisher.send_batches(records[:1]))
            raise ConnectionError("send failed (injected)")
        futures = await self._publisher.send_batches(records)
        failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        failed.set_exception(KafkaTimeoutError("acknowledgement failed (injected)"))
        return [*futures, failed]


async def inputs(probe: KafkaProbe) -> dict[str, ConsumerRecord]:
    """The customer's first two messages and an opt-out, produced and fetched back as records."""
    for n in (1, 2):
        at = T0 + timedelta(seconds=n)
        message = CustomerMessageReceived(
            message_id=f"msg-{n}", customer_id=CUSTOMER, channel=Channel.SMS, address="+12065550100",
            provider_message_id=f"p-{n}", text=f"hello {n}", sent_at=at, received_at=at, new_customer=n == 1,
        )  # fmt: skip
        await probe.send(MESSAGES_RECEIVED.name, CUSTOMER, message, time=at, id=f"msg-{n}")
    opt_out = OptOutOfHomeTeam(command_id="cmd-1", customer_id=CUSTOMER, requested_at=T0 + timedelta(seconds=1.5))
    await probe.send(CUSTOMER_COMMANDS.name, CUSTOMER, opt_out, time=opt_out.requested_at, id="cmd-1")
    records = [*await probe.records(MESSAGES_RECEIVED.name), *await probe.records(CUSTOMER_COMMANDS.name)]
    by_id = {json.loads(r.value)["id"]: r for r in records}
    return {"m1": by_id["msg-1"], "m2": by_id["msg-2"], "opt_out": by_id["cmd-1"]}


class Harness:
    """conversation-state's consumer parts against the test's topics and database: ``process``
    makes a consumer as a process of the service would (a new one: a new process), publishing
    through ``sender`` (the real publisher, or one failing once)."""

    def __init__(self, kafka: str, topic_prefix: str, publisher: Publisher, registry: CollectorRegistry, store: ConversationStore) -> None:
        self.kafka, self.topic_prefix, self.publisher, self.store = kafka, topic_prefix, publisher, store
        self.mongodb_url = self.db_name = ""  # (set by the fixture)
        self.dead_letters = DeadLetters(publisher, "conversation-state", registry)

    def process(
        self, sender: Any = None, loaded: Counter | None = None, max_clean: int = 20_000, partition_ends: Any = None
    ) -> ConversationConsumer:
        return ConversationConsumer(
            reader=BatchReader(INPUTS, self.dead_letters, self.topic_prefix),
            store=self.store,
            outbox=Outbox(sender or self.publisher, "/hometeam/conversation-state", self.topic_prefix),
            rules=Rules(DIRECTORY),
            tracing=RecordTracer(NoOpTracer(), "conversation-state"),
            memory=JournaledCustomers(self.store, interval_s=60.0, max_clean=max_clean),
            loaded=loaded,
            partition_ends=partition_ends,
        )

    async def events(self) -> list[dict[str, Any]]:
        """The envelopes on the conversation events topic, all of them so far."""
        async with KafkaProbe(self.kafka, self.topic_prefix) as probe:
            return [json.loads(r.value) for r in await probe.records(CONVERSATION_EVENTS.name)]


@pytest.fixture
async def harness(infra, topic_prefix, mongo_db_name) -> AsyncIterator[tuple[Harness, dict[str, ConsumerRecord]]]:
    """The harness, and the inputs on the topics as records."""
    settings = ServiceSettings(service_name="conversation-state", kafka_bootstrap_servers=infra.kafka, kafka_topic_prefix=topic_prefix)
    async with KafkaProbe(infra.kafka, topic_prefix) as probe:
        records = await inputs(probe)
    registry = CollectorRegistry()
    publisher = Publisher(lambda: build_producer(settings), NoOpTracer(), registry)
    await publisher.start()
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True)
    try:
        harness = Harness(infra.kafka, topic_prefix, publisher, registry, ConversationStore(client[mongo_db_name]))
        harness.mongodb_url, harness.db_name = infra.mongodb_url, mongo_db_name
        yield harness, records
    finally:
        await publisher.stop()
        await client.close()


@pytest.mark.parametrize("restarted", [False, True], ids=["retried", "restarted"])
@pytest.mark.parametrize("failing", ["journal", "send", "acknowledgement"])
async def test_a_batch_that_fails_at_any_step_leaves_the_customers_events_numbered_once_each(harness, failing, restarted) -> None:
    """``restarted``: the batch comes again to another process (the first one died after the
    failure), which knows nothing of what the first one published."""
    harness, records = harness
    store = harness.store
    # The first batch's step that fails: the journal insert, the sending of its outputs (the
    # first is out), Kafka's acknowledgement of its outputs.
    sender: Any = None
    if failing == "journal":
        store.journal = FailsOnce(store.journal, "insert_many")
    else:
        sender = FailingSender(harness.publisher, acknowledgement=failing == "acknowledgement")

    consumer = harness.process(sender)
    with pytest.raises(Exception, match="injected"):
        await consumer.handle([records["m1"], records["opt_out"]])
    if failing == "journal":
        # Nothing of the attempt is stored: a line stored before its entry could stay at a
        # position the retry, applying another order, leaves empty or fills differently.
        assert [d async for d in store.messages.find({})] == []
    if restarted:
        consumer = harness.process()
    # After the rewind the fetch differs: the second message with the first, the opt-out in a
    # batch of its own after them.
    await consumer.handle([records["m1"], records["m2"]])
    await consumer.handle([records["opt_out"]])

    numbers: dict[str, set[int]] = defaultdict(set)
    types: dict[str, str] = {}
    for envelope in await harness.events():
        if envelope["subject"] == CUSTOMER:
            numbers[envelope["id"]].add(envelope["sequence"])
            types[envelope["id"]] = envelope["type"]
    assert {i: n for i, n in numbers.items() if len(n) > 1} == {}, "an event published under two numbers"
    used = sorted(n for ns in numbers.values() for n in ns)
    assert used == list(range(1, len(numbers) + 1)), "sequence numbers reused or skipped"
    added = [i for i, t in types.items() if t.endswith("MessageAdded")]
    assert len(added) == 2 and any(t.endswith("CustomerPreferencesChanged") for t in types.values())

    # What the journal holds as applied is what was published and stored: the customer's last
    # number, the opt-out, both messages' transcript lines; and once stored, the journal is empty.
    customer = consumer.memory.records[CUSTOMER].customer
    assert customer is not None and customer.seq == len(numbers) and customer.opted_out
    consumer.memory.flush()
    await consumer.memory.settle()
    assert sorted([d["message_id"] async for d in store.messages.find({"customer_id": CUSTOMER})]) == ["msg-1", "msg-2"]
    stored = await store.find_customer(CUSTOMER)
    assert stored is not None and stored["seq"] == len(numbers)
    assert [entry_contents(e) async for e in store.journal.find({})] == []


async def test_outputs_kafka_acknowledged_are_not_published_again_by_the_process_that_sent_them(harness) -> None:
    """A recovery publishes again only the entries whose outputs are not known to be out: after
    a failed batch, the process's earlier batches (journaled, not stored yet) are not sent twice."""
    harness, records = harness
    sender = FailingSender(harness.publisher, acknowledgement=True, at=0)  # armed below
    consumer = harness.process(sender)
    await consumer.handle([records["m1"]])
    sender.at = sender.calls + 1  # the opt-out's event: sent, its acknowledgement fails
    with pytest.raises(Exception, match="injected"):
        await consumer.handle([records["opt_out"]])
    await consumer.handle([records["opt_out"], records["m2"]])

    copies: dict[str, int] = defaultdict(int)
    for envelope in await harness.events():
        copies[envelope["type"].rsplit(".", 1)[-1] + ":" + envelope["id"]] += 1
    by_type: dict[str, list[int]] = defaultdict(list)
    for name, n in copies.items():
        by_type[name.split(":")[0]].append(n)
    # The opt-out's event twice (sent, then again by the recovery, as its acknowledgement
    # failed); every event of the two messages once.
    assert by_type.pop("CustomerPreferencesChanged") == [2]
    assert len(by_type["MessageAdded"]) == 2
    assert {n for ns in by_type.values() for n in ns} == {1}, by_type


def _line(n: int, text: str, gen: int) -> dict[str, Any]:
    line = Line(
        message_id=f"msg-{n}", conversation_id="conv_1", customer_id=CUSTOMER, direction=Direction.INBOUND,
        channel=Channel.SMS, text=text, at=T0 + timedelta(seconds=n, microseconds=1234), seq=n,
    )  # fmt: skip
    return {**line.to_doc(), "gen": gen}


async def test_a_recovery_stores_a_journaled_line_as_the_generation_that_applied_it(harness) -> None:
    """An entry journaled late by a member whose session had lapsed (generation 5) holds a line
    at a position the partition's next owner (generation 6) stored since: a later recovery
    (generation 7) stores the entry's line as generation 5's, so the owner's line stays; and a
    line already stored as the entry holds it is not rewritten."""
    harness, _ = harness
    store = harness.store
    writes = StoreWrites()
    client: AsyncMongoClient = AsyncMongoClient(harness.mongodb_url, tz_aware=True, event_listeners=[writes])
    try:
        watched = ConversationStore(client[harness.db_name])
        late = JournaledCustomers(store, interval_s=60.0)
        await late.append({}, {}, lines={0: [_line(1, "late", gen=5), _line(2, "same", gen=5)]})
        await store.save_line_docs([_line(1, "owner's", gen=6), _line(2, "same", gen=5)])
        recovering = JournaledCustomers(watched, interval_s=60.0)
        recovering.consumer = lambda: SimpleNamespace(_coordinator=SimpleNamespace(generation=7))  # type: ignore[assignment,return-value]
        writes.ops.clear()
        await recovering.recover([0])
        stored = {d["seq"]: (d["text"], d["gen"]) async for d in store.messages.find({})}
        assert stored == {1: ("owner's", 6), 2: ("same", 5)}
        assert [op for op in writes.ops if op[1] == "messages" and op[0] != "insert"] == []  # nothing replaced
        assert set(recovering.finished) == {e["_id"] async for e in store.journal.find({})}
    finally:
        await client.close()


async def _transcript(consumer: ConversationConsumer, store: ConversationStore) -> list[str]:
    """The customer's current transcript as the owner's read API reads it (lines not stored
    yet included)."""
    customer = consumer.memory.records[CUSTOMER].customer
    assert customer is not None and customer.open_conversation_id is not None
    doc = consumer.memory.latest(customer.open_conversation_id, CUSTOMER) or await store.find_conversation(customer.open_conversation_id)
    assert doc is not None
    lines, total = await store.read_page(doc, 0, 10, consumer.memory.unstored_lines)
    assert total == len(lines)
    return [d["message_id"] for d in lines]


async def _stored_lines(store: ConversationStore) -> list[str]:
    return sorted([d["message_id"] async for d in store.messages.find({"customer_id": CUSTOMER})])


class FailsTimes(FailsOnce):
    """``target`` with its method ``name`` failing at its first ``times`` calls."""

    def __init__(self, target: Any, name: str, times: int) -> None:
        super().__init__(target, name)
        self.times = times

    def fails(self, call: int) -> bool:
        return call <= self.times


async def test_lines_are_stored_off_the_batch_and_shown_until_then(harness) -> None:
    """A batch's transcript lines are stored by the line writer, not on the batch's path: a
    line insert that fails does not fail the batch; the owner's read API shows the lines from
    memory; the journal entries holding them stay until they are stored (a write that cannot
    store them keeps them), and a later try stores them."""
    harness, records = harness
    store = harness.store
    store.messages = FailsTimes(store.messages, "insert_many", times=2)
    consumer = harness.process()
    await consumer.handle([records["m1"], records["m2"]])  # (its line write fails: the first)
    await consumer.memory.settle()
    assert await _stored_lines(store) == []
    assert await _transcript(consumer, store) == ["msg-1", "msg-2"]

    consumer.memory.flush()  # the customers land; the lines fail again (the second): entries kept
    await consumer.memory.settle()
    assert await _stored_lines(store) == []
    assert await store.journal.count_documents({}) > 0
    assert await _transcript(consumer, store) == ["msg-1", "msg-2"]

    consumer.memory.flush()
    await consumer.memory.settle()
    assert await _stored_lines(store) == ["msg-1", "msg-2"]
    assert consumer.memory.unstored_lines == {}
    assert await store.journal.count_documents({}) == 0
    assert await _transcript(consumer, store) == ["msg-1", "msg-2"]


async def test_the_lines_of_a_process_that_stopped_before_storing_them_are_stored_by_the_next_owner(harness) -> None:
    harness, records = harness
    store = harness.store
    lines = store.messages
    store.messages = FailsTimes(lines, "insert_many", times=1)
    first = harness.process()
    await first.handle([records["m1"]])  # (its line write fails, and the process stops)
    await first.memory.settle()
    assert await _stored_lines(store) == []
    store.messages = lines
    second = harness.process()
    await second.handle([records["m2"]])  # the recovery stores the journaled line first
    await second.memory.settle()
    assert await _stored_lines(store) == ["msg-1", "msg-2"]
    assert await _transcript(second, store) == ["msg-1", "msg-2"]
    second.memory.flush()
    await second.memory.settle()
    assert await store.journal.count_documents({}) == 0


async def test_the_lines_a_dropped_memory_held_are_stored_by_its_recovery(harness) -> None:
    """A failed batch drops the memory, with the lines of the batches before it that no write
    stored yet: the recovery stores them from their entries, although their outputs were out
    (and are not published again)."""
    harness, records = harness
    store = harness.store
    sender = FailingSender(harness.publisher, acknowledgement=False, at=2)
    consumer = harness.process(sender)
    store.messages = FailsTimes(store.messages, "insert_many", times=1)
    await consumer.handle([records["m1"]])
    await consumer.memory.settle()  # (its line write failed: msg-1 waits in memory)
    assert "msg-1" not in await _stored_lines(store) and consumer.memory.unstored_lines
    with pytest.raises(Exception, match="injected"):
        await consumer.handle([records["m2"]])
    assert consumer.memory.unstored_lines == {}
    await consumer.handle([records["m2"]])
    assert await _stored_lines(store) == ["msg-1", "msg-2"]  # both from the journal, by the recovery
    added: dict[str, int] = defaultdict(int)  # MessageAdded records by message
    for envelope in await harness.events():
        if envelope["type"].endswith("MessageAdded"):
            added[envelope["data"]["message_id"]] += 1
    assert added["msg-1"] == 1  # its batch's outputs were out: not published again
    assert added["msg-2"] >= 1


async def test_each_batch_counts_where_its_customers_state_came_from(harness) -> None:
    """``hometeam_state_customers_loaded_total{source}``: new (known to have nothing stored),
    store (its records left memory once stored: read), memory (kept since)."""
    harness, records = harness
    registry = CollectorRegistry()
    loaded = Counter("hometeam_state_customers_loaded_total", "", ["source"], registry=registry)

    def counts() -> tuple[float, ...]:
        """(new, store, memory)"""
        sample = registry.get_sample_value
        return tuple(sample("hometeam_state_customers_loaded_total", {"source": s}) or 0.0 for s in ("new", "store", "memory"))

    async def from_the_start(partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(partitions, 0)  # (every record is past the end: ``new_customer`` counts)

    consumer = harness.process(loaded=loaded, max_clean=0, partition_ends=from_the_start)
    await consumer.handle([records["m1"]])
    assert counts() == (1, 0, 0)
    await consumer.handle([records["opt_out"]])  # (not stored yet: in memory whatever the cache)
    assert counts() == (1, 0, 1)
    consumer.memory.flush()
    await consumer.memory.settle()  # stored; with no cache its records leave memory
    await consumer.handle([records["m2"]])
    assert counts() == (1, 1, 1)
