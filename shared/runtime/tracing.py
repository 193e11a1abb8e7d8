"""Per-record trace context through batch consumers.

FastStream's middleware gives a batch one span of its own (linked to the records). To keep
one trace per customer message across services, each record's outputs are published inside
a span that continues the record's own W3C ``traceparent`` header; the publish then carries
that trace on. Attributes follow OpenTelemetry's messaging conventions and never carry the
record key, payload or any personal data.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from aiokafka import ConsumerRecord
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
# What ``span`` gives for a record without a trace when the service records no spans (no
# exporter: a NoOpTracer): there is no trace to continue and none to start, so the context,
# the attributes and the span (~5 µs per record) are skipped. A record with a trace still
# gets its span, so that its trace passes on to the outputs.
_NOT_TRACED: AbstractContextManager[trace.Span] = nullcontext(trace.INVALID_SPAN)
_TRACE_HEADERS = ("traceparent", "tracestate")


class RecordTracer:
    def __init__(self, tracer: Tracer, service: str) -> None:
        self._tracer = tracer
        self._service = service
        self._off = isinstance(tracer, trace.NoOpTracer)

    def span(self, record: ConsumerRecord, message_id: str | None = None) -> AbstractContextManager[trace.Span]:
        """A CONSUMER 'process' span continuing the record's trace (or a new trace)."""
        if self._off and not any(key in _TRACE_HEADERS for key, _ in record.headers or ()):
            return _NOT_TRACED
        return self._span(record, message_id)

    @contextmanager
    def _span(self, record: ConsumerRecord, message_id: str | None) -> Iterator[trace.Span]:
        carrier = {}
        for key, value in record.headers or ():
            if key in _TRACE_HEADERS:
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
