"""A service with nowhere to send spans records none, and still passes the caller's trace on:
the ``traceparent`` it puts on its outputs is the one it received."""

from __future__ import annotations

from aiokafka import ConsumerRecord
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.runtime.outbox import _with_trace
from shared.runtime.telemetry import build_tracer_provider
from shared.runtime.tracing import RecordTracer
from shared.settings import ServiceSettings

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def received(traceparent: str | None) -> ConsumerRecord:
    headers = [("traceparent", traceparent.encode())] if traceparent else []
    return ConsumerRecord("t", 0, 7, 0, 0, None, b"{}", None, 0, 2, headers)


def passed_on(provider: trace.TracerProvider, traceparent: str | None) -> str | None:
    tracer = RecordTracer(provider.get_tracer("test"), "svc")
    with tracer.span(received(traceparent)):
        return dict(_with_trace([])).get("traceparent", b"").decode() or None


def test_without_an_exporter_nothing_is_recorded_and_the_trace_passes_through() -> None:
    provider = build_tracer_provider(ServiceSettings(service_name="svc"))
    assert isinstance(provider, trace.NoOpTracerProvider)
    assert passed_on(provider, PARENT) == PARENT  # the caller's trace continues downstream
    assert passed_on(provider, None) is None  # no trace was started: none is invented


def test_with_a_span_processor_spans_are_recorded_as_children() -> None:
    exporter = InMemorySpanExporter()
    provider = build_tracer_provider(ServiceSettings(service_name="svc"), [SimpleSpanProcessor(exporter)])
    assert isinstance(provider, TracerProvider)
    out = passed_on(provider, PARENT)
    assert out is not None and out.split("-")[1] == PARENT.split("-")[1] and out != PARENT  # same trace, new span
    assert [s.name for s in exporter.get_finished_spans()] == ["process t"]


class CountingNoOpTracer(trace.NoOpTracer):
    """The tracer of a service that records nothing, counting the spans it is asked for."""

    def __init__(self) -> None:
        self.started = 0

    def start_as_current_span(self, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        self.started += 1
        return super().start_as_current_span(*args, **kwargs)


def test_without_an_exporter_a_record_without_a_trace_costs_no_span() -> None:
    """No trace to continue and none to start: the record's span is skipped (~5 µs each), and
    a record with a trace still gets one, to pass its trace on."""
    tracer = CountingNoOpTracer()
    records = RecordTracer(tracer, "svc")
    with records.span(received(None)) as span:
        assert not span.is_recording() and dict(_with_trace([])).get("traceparent") is None
    assert tracer.started == 0
    with records.span(received(PARENT)):
        assert dict(_with_trace([]))["traceparent"].decode() == PARENT
    assert tracer.started == 1


def test_the_broker_has_a_telemetry_middleware_only_when_spans_are_recorded() -> None:
    """FastStream's telemetry middleware reads every record's headers and makes a span per
    batch: with nothing to receive spans it is left out (2-6% of a service's CPU)."""
    from prometheus_client import CollectorRegistry

    from shared.runtime.kafka import build_broker
    from shared.runtime.telemetry import KeylessKafkaTelemetryMiddleware

    settings = ServiceSettings(service_name="svc")

    def telemetry(provider: trace.TracerProvider) -> list[object]:
        broker = build_broker(settings, metrics_registry=CollectorRegistry(), tracer_provider=provider)
        return [m for m in broker.middlewares if isinstance(m, KeylessKafkaTelemetryMiddleware)]

    assert telemetry(build_tracer_provider(settings)) == []
    assert len(telemetry(build_tracer_provider(settings, [SimpleSpanProcessor(InMemorySpanExporter())]))) == 1
