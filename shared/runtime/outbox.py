"""Publishing a batch's outputs: envelopes built in one place, sent without waiting on each
record, then awaited together before the batch's offsets are committed.

Records go straight to an aiokafka producer (acks=all, idempotent). Queuing a record does not
let the event loop turn (nothing in ``send`` waits unless the producer's buffer is full), so
a batch's outputs are all queued before the producer's sender runs and leave as one request
without a linger (``PRODUCER_LINGER_MS``, 0). The W3C trace context of the current span travels in the ``traceparent`` header,
under a PRODUCER span when the trace is sampled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple

from aiokafka import AIOKafkaProducer
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel

from shared.contracts.envelope import new_envelope

_PROPAGATOR = TraceContextTextMapPropagator()
_CLOUDEVENTS = b"application/cloudevents+json"


class Publisher:
    """The service's one producer for outputs and dead letters, with a published-records
    counter (by topic) and trace propagation. Started and stopped with the service."""

    def __init__(self, make_producer: Callable[[], AIOKafkaProducer], tracer: Tracer, registry: CollectorRegistry) -> None:
        # aiokafka clients belong to an event loop: the producer is made when the service starts.
        self._make_producer = make_producer
        self._producer: AIOKafkaProducer | None = None
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
        """Queue one record; returns the future of its acknowledgement."""
        current = trace.get_current_span()
        if current.is_recording():
            with self.tracer.start_as_current_span(
                f"send {topic}",
                kind=SpanKind.PRODUCER,
                attributes={"messaging.system": "kafka", "messaging.operation.type": "send", "messaging.destination.name": topic},
            ):
                headers = _with_trace(headers)
                future = await self.producer.send(topic, value, key=key, headers=headers)
        else:
            future = await self.producer.send(topic, value, key=key, headers=_with_trace(headers))
        counter = self._published_to.get(topic)
        if counter is None:
            counter = self._published_to[topic] = self.published.labels(topic)
        counter.inc()
        return future


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
    """One batch's outputs (or one webhook's): ``send`` queues, ``flush`` waits for Kafka.
    ``record`` makes an output without sending it, ``send_record`` sends one so made."""

    def __init__(self, publisher: Publisher, source: str, topic_prefix: str = "") -> None:
        self._publisher = publisher
        self._source = source
        self._prefix = topic_prefix
        self._pending: list[asyncio.Future[Any]] = []

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
        envelope = new_envelope(payload, subject=key, source=self._source, time=time, id=id, sequence=sequence)
        return OutputRecord(self._prefix + topic, key.encode(), envelope.model_dump_json().encode(), envelope.type)

    async def send_record(self, record: OutputRecord) -> None:
        future = await self._publisher.send(
            record.topic, record.value, record.key, [("content-type", _CLOUDEVENTS), ("ce-type", record.type.encode())]
        )
        self._pending.append(future)

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)

    def abandon(self) -> None:
        """Forget the records queued since the last ``flush`` (their batch failed and comes
        again): the next ``flush`` waits only for what is queued after this."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.add_done_callback(_retrieved)


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # (retrieved: no "never retrieved" warning for an abandoned record)
