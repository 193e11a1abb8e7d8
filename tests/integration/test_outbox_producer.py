"""The producer every service's outputs go through, against the real broker: a batch's
outputs are queued without the event loop turning, so without a linger they leave at once,
as one request (``PRODUCER_LINGER_MS`` 0; aiokafka's ``send`` yields only when its buffer
is full). A linger would hold them back for nothing."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from shared.runtime.kafka import build_producer
from shared.settings import ServiceSettings

pytestmark = pytest.mark.integration


async def _drained_after_a_few_turns(producer: Any) -> bool:
    for _ in range(20):  # event-loop turns, no time: the sender needs two or three
        await asyncio.sleep(0)
        if not producer._message_accumulator._batches:
            return True
    return False


@pytest.mark.parametrize(("linger_ms", "at_once"), [(None, True), (50, False)])
async def test_a_batch_of_outputs_leaves_at_once_in_one_request(infra, topic_prefix, linger_ms, at_once) -> None:
    overrides = {} if linger_ms is None else {"producer_linger_ms": linger_ms}  # None: the services' default
    settings = ServiceSettings(service_name="test", kafka_bootstrap_servers=infra.kafka, **overrides)
    producer = build_producer(settings)
    await producer.start()
    accumulator = producer._message_accumulator
    requests: list[int] = []
    drain = accumulator.drain_by_nodes

    def counted(*args: Any, **kwargs: Any) -> Any:
        nodes, unknown = drain(*args, **kwargs)
        if nodes:
            requests.append(sum(len(batches) for batches in nodes.values()))
        return nodes, unknown

    accumulator.drain_by_nodes = counted
    try:
        topic = f"{topic_prefix}conversations.events.v1"
        partitions = await producer.partitions_for(topic)
        # A new topic's partitions answer "not leader" for a moment: settled first.
        await asyncio.gather(*[await producer.send(topic, b"warm-up", partition=p) for p in partitions])
        requests.clear()
        for _ in range(3):
            futures = [await producer.send(topic, b"x" * 300, key=f"customer-{i}".encode()) for i in range(200)]
            assert await _drained_after_a_few_turns(producer) is at_once
            await asyncio.gather(*futures)
        # Each round's records: one batch per partition, none split (a partition whose previous
        # request is still being acknowledged goes in the next request: idempotence allows one
        # in flight per partition).
        assert sum(requests) == 3 * len(partitions)
    finally:
        await producer.stop()



async def test_an_outbox_flush_sends_one_batch_per_partition_where_send_would_put_each_record(infra, topic_prefix) -> None:
    """``Outbox.flush`` hands its records to the producer as a batch per partition: each
    record lands on the partition the producer's own ``send`` picks for its key (murmur2, as
    every Kafka client), in the order queued, with its headers; a record larger than a batch
    goes all the same; the published counter counts each record."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.partitioner import murmur2
    from opentelemetry.trace import NoOpTracer
    from prometheus_client import CollectorRegistry

    from shared.contracts.customers import OptOutOfHomeTeam
    from shared.runtime.kafka import RememberingPartitioner
    from shared.runtime.outbox import Outbox, OutputRecord, Publisher

    settings = ServiceSettings(service_name="test", kafka_bootstrap_servers=infra.kafka)
    registry = CollectorRegistry()
    partitioner = RememberingPartitioner()
    publisher = Publisher(lambda: build_producer(settings, partitioner), NoOpTracer(), registry, partitioner)
    await publisher.start()
    topic = "customers.commands.v1"
    at = datetime(2026, 12, 5, 12, tzinfo=UTC)
    keys = [f"cus_{n % 7}" for n in range(120)]
    try:
        outbox = Outbox(publisher, "/test", topic_prefix)
        for n, key in enumerate(keys):
            await outbox.send(topic, key, OptOutOfHomeTeam(command_id=f"cmd-{n}", customer_id=key, requested_at=at), id=f"e{n}", time=at)
        big = json.dumps({"id": "big", "type": "test.big", "pad": "x" * 300_000}).encode()  # > max_batch_size (256 KB)
        await outbox.send_record(OutputRecord(topic_prefix + topic, b"cus_big", big, "test.big"))
        await outbox.flush()
        count = len(await publisher.producer.partitions_for(topic_prefix + topic))
    finally:
        await publisher.stop()
    assert registry.get_sample_value("hometeam_records_published_total", {"topic": topic_prefix + topic}) == len(keys) + 1

    consumer = AIOKafkaConsumer(topic_prefix + topic, bootstrap_servers=infra.kafka, auto_offset_reset="earliest", max_partition_fetch_bytes=2**20)
    await consumer.start()
    try:
        records = []
        deadline = asyncio.get_running_loop().time() + 20
        while len(records) < len(keys) + 1 and asyncio.get_running_loop().time() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    assert len(records) == len(keys) + 1 and count > 1
    by_key: dict[str, list[str]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        envelope = json.loads(record.value)
        assert record.partition == (murmur2(record.key) & 0x7FFFFFFF) % count  # where send puts it
        assert dict(record.headers)["ce-type"] == envelope["type"].encode()
        by_key.setdefault(record.key.decode(), []).append(envelope["id"])
    assert by_key.pop("cus_big") == ["big"]
    assert by_key == {k: [f"e{n}" for n, key in enumerate(keys) if key == k] for k in set(keys)}  # in order per key


async def test_the_fetch_wait_tuner_sets_a_real_consumers_fetch_wait(infra, topic_prefix) -> None:
    """``FetchWaitTuner`` sets the wait aiokafka's fetcher puts in each fetch request it
    builds (``Fetcher._fetch_max_wait_ms``, 0.14): present on a started consumer with the
    configured value, and changed by the tuner (guards an aiokafka upgrade that moves it)."""
    from aiokafka import AIOKafkaConsumer

    from shared.runtime.kafka import FetchWaitTuner

    consumer = AIOKafkaConsumer(
        f"{topic_prefix}channel.inbound.v1", bootstrap_servers=infra.kafka, fetch_max_wait_ms=40, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        await consumer.getmany(timeout_ms=100)
        assert consumer._fetcher._fetch_max_wait_ms == 40
        tuner = FetchWaitTuner(10, 40, light_below_per_s=100, window_s=1)
        tuner.note(5)
        assert tuner.tick(consumer) == 10
        assert consumer._fetcher._fetch_max_wait_ms == 10
        assert tuner.tick(consumer) == 40  # a second without records: idle
        assert consumer._fetcher._fetch_max_wait_ms == 40
    finally:
        await consumer.stop()
