"""Publishing a batch's outputs: envelopes built in one place, queued, then sent together and
awaited before the batch's offsets are committed.

Records go to an aiokafka producer (acks=all, idempotent). ``Outbox.flush`` hands a batch's
queued records to the producer as one ``BatchBuilder`` per partition (``Publisher.send_batches``)
instead of one ``send`` each: a record then costs an append to its partition's batch, not a
coroutine, a future and its resolution of its own (aiokafka's per-record path, ~10 µs each).
The batches leave as one request without a linger (``PRODUCER_LINGER_MS``, 0). The W3C trace
context of the current span travels in the ``traceparent`` header, under a PRODUCER span when
the trace is sampled; it is taken when a record is queued (the span of the input it answers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from aiokafka import AIOKafkaProducer
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel

from shared.contracts.envelope import envelope_json, type_name
from shared.runtime.kafka import RememberingPartitioner

_PROPAGATOR = TraceContextTextMapPropagator()
_CLOUDEVENTS = b"application/cloudevents+json"


# A record queued for ``Publisher.send_batches``: topic, value, key, headers.
Queued = tuple[str, bytes, bytes, list[tuple[str, bytes]]]


class Publisher:
    """The service's one producer for outputs and dead letters, with a published-records
    counter (by topic) and trace propagation. Started and stopped with the service.
    ``partitioner``: the producer's own (``build_producer``), so that a record sent in a batch
    goes to the partition ``send`` would pick."""

    def __init__(
        self,
        make_producer: Callable[[], AIOKafkaProducer],
        tracer: Tracer,
        registry: CollectorRegistry,
        partitioner: Callable[[bytes | None, list[int], list[int]], int] | None = None,
    ) -> None:
        # aiokafka clients belong to an event loop: the producer is made when the service starts.
        self._make_producer = make_producer
        self._producer: AIOKafkaProducer | None = None
        self.partitioner = partitioner if partitioner is not None else RememberingPartitioner()
        self.tracer = tracer
        self.published = Counter(
            "hometeam_records_published_total", "Records this service published, by topic.", ["topic"], registry=registry
        )
        self._published_to: dict[str, Any] = {}  # topic → its counter (a label lookup per record cost ~3% of a service)

    async def start(self) -> None:
        self._producer = self._make_producer()
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("the publisher is not started")
        return self._producer

    async def send(
        self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[Any]:
        """Queue one record now; returns the future of its acknowledgement."""
        future = await self.producer.send(topic, value, key=key, headers=self.traced(topic, headers))
        self._count(topic, 1)
        return future

    def traced(self, topic: str, headers: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """``headers`` with the current trace context, under a PRODUCER span if it is sampled."""
        if trace.get_current_span().is_recording():
            with self.tracer.start_as_current_span(
                f"send {topic}",
                kind=SpanKind.PRODUCER,
                attributes={"messaging.system": "kafka", "messaging.operation.type": "send", "messaging.destination.name": topic},
            ):
                return _with_trace(headers)
        return _with_trace(headers)

    async def send_batches(self, records: Sequence[Queued]) -> list[asyncio.Future[Any]]:
        """Hand these records (headers as ``traced`` made them) to the producer as one batch per
        partition, in order; returns the futures of the batches' acknowledgements."""
        producer = self.producer
        partitions: dict[str, list[int]] = {}
        batches: dict[tuple[str, int], Any] = {}
        counts: dict[str, int] = {}
        futures: list[asyncio.Future[Any]] = []
        try:
            for topic, value, key, headers in records:
                ids = partitions.get(topic)
                if ids is None:
                    ids = partitions[topic] = sorted(await producer.partitions_for(topic))
                partition = self.partitioner(key, ids, ids)
                batch = batches.get((topic, partition))
                if batch is None:
                    batch = batches[(topic, partition)] = producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    # Full (``max_batch_size``): it goes, and a new one follows it (a batch
                    # takes its first record whatever its size).
                    futures.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = batches[(topic, partition)] = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None, headers=headers)
                counts[topic] = counts.get(topic, 0) + 1
            for (topic, partition), batch in batches.items():
                futures.append(await producer.send_batch(batch, topic, partition=partition))
        except BaseException:
            for future in futures:
                future.add_done_callback(_retrieved)
            raise
        for topic, n in counts.items():
            self._count(topic, n)
        return futures

    def _count(self, topic: str, n: int) -> None:
        counter = self._published_to.get(topic)
        if counter is None:
            counter = self._published_to[topic] = self.published.labels(topic)
        counter.inc(n)


def _with_trace(headers: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    if not carrier:
        return headers
    kept = [(k, v) for k, v in headers if k not in ("traceparent", "tracestate")]
    return kept + [(k, v.encode()) for k, v in carrier.items()]


class OutputRecord(NamedTuple):
    """An output as it goes to Kafka (the topic with its prefix), made before it is sent: what
    a journal keeps so that it can be published again, byte for byte (``Outbox.record``)."""

    topic: str
    key: bytes
    value: bytes
    type: str  # the envelope's ``type`` (the ``ce-type`` header)

    def to_list(self) -> list[Any]:
        return [self.topic, self.key, self.value, self.type]

    @classmethod
    def from_list(cls, fields: list[Any]) -> OutputRecord:
        topic, key, value, type_ = fields
        return cls(topic, bytes(key), bytes(value), type_)


class Outbox:
    """One batch's outputs (or one webhook's): ``send`` queues, ``flush`` sends what is queued
    and waits for Kafka. ``record`` makes an output without queuing it, ``send_record`` queues
    one so made."""

    def __init__(self, publisher: Publisher, source: str, topic_prefix: str = "") -> None:
        self._publisher = publisher
        self._source = source
        self._prefix = topic_prefix
        self._queued: list[Queued] = []

    async def send(
        self,
        topic: str,
        key: str,
        payload: BaseModel,
        *,
        id: str,
        time: datetime,
        sequence: int | None = None,
    ) -> None:
        await self.send_record(self.record(topic, key, payload, id=id, time=time, sequence=sequence))

    def record(
        self,
        topic: str,
        key: str,
        payload: BaseModel,
        *,
        id: str,
        time: datetime,
        sequence: int | None = None,
    ) -> OutputRecord:
        """The record ``send`` would queue, not sent."""
        value = envelope_json(payload, subject=key, source=self._source, time=time, id=id, sequence=sequence)
        return OutputRecord(self._prefix + topic, key.encode(), value, type_name(type(payload)))

    async def send_record(self, record: OutputRecord) -> None:
        headers = [("content-type", _CLOUDEVENTS), ("ce-type", record.type.encode())]
        self._queued.append((record.topic, record.value, record.key, self._publisher.traced(record.topic, headers)))

    async def flush(self) -> None:
        queued, self._queued = self._queued, []
        if queued:
            await asyncio.gather(*await self._publisher.send_batches(queued))

    def abandon(self) -> None:
        """Forget the records queued since the last ``flush`` (their batch failed and comes
        again): they are not sent, and the next ``flush`` sends only what is queued after this.
        (Records a ``flush`` that failed handed to Kafka may still arrive.)"""
        self._queued = []


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # (retrieved: no "never retrieved" warning for an abandoned record)
