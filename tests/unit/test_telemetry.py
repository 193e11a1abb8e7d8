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
