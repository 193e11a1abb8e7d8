"""Per-record trace context through batch consumers.

FastStream's middleware gives a batch one span of its own (linked to the records). To keep
one trace per customer message across services, each record's outputs are published inside
a span that continues the record's own W3C ``traceparent`` header; the publish then carries
that trace on. Attributes follow OpenTelemetry's messaging conventions and never carry the
record key, payload or any personal data.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from aiokafka import ConsumerRecord
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


class RecordTracer:
    def __init__(self, tracer: Tracer, service: str) -> None:
        self._tracer = tracer
        self._service = service

    @contextmanager
    def span(self, record: ConsumerRecord, message_id: str | None = None) -> Iterator[trace.Span]:
        """A CONSUMER 'process' span continuing the record's trace (or a new trace)."""
        carrier = {}
        for key, value in record.headers or ():
            if key in ("traceparent", "tracestate"):
                carrier[key] = value.decode("latin-1")
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        attributes = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": record.topic,
            "messaging.destination.partition.id": str(record.partition),
            "messaging.kafka.offset": record.offset,
            "messaging.consumer.group.name": self._service,
        }
        if message_id:
            attributes["messaging.message.id"] = message_id
        with self._tracer.start_as_current_span(
            f"process {record.topic}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        ) as span:
            yield span

    @contextmanager
    def server_span(self, name: str, attributes: dict[str, str]) -> Iterator[trace.Span]:
        """A SERVER span for an HTTP request that starts a trace (the webhooks)."""
        with self._tracer.start_as_current_span(name, kind=SpanKind.SERVER, attributes=attributes) as span:
            yield span
