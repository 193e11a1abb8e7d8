"""Traces: one tracer provider per service, W3C trace context through Kafka headers.

A service with nowhere to send spans (no OTLP endpoint, no span processor given) gets
OpenTelemetry's no-op provider: recording spans that nobody exports cost 15% of
conversation-state's CPU under load. Its spans are then the incoming record's context
itself, so the ``traceparent`` it passes on still continues the caller's trace: a service
without an exporter is transparent in a trace instead of breaking it.

Kafka record keys never become span attributes: a channel adapter might key a record by a
phone number, and keys are not needed to follow a trace.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware
from faststream.kafka.opentelemetry.provider import (
    BatchKafkaTelemetrySettingsProvider,
    KafkaTelemetrySettingsProvider,
)
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.semconv.trace import SpanAttributes

from shared.settings import ServiceSettings

_KEY = SpanAttributes.MESSAGING_KAFKA_MESSAGE_KEY


class _KeylessSingle(KafkaTelemetrySettingsProvider):
    def get_consume_attrs_from_message(self, msg: Any) -> dict[str, Any]:
        attrs = super().get_consume_attrs_from_message(msg)
        attrs.pop(_KEY, None)
        return attrs

    def get_publish_attrs_from_cmd(self, cmd: Any) -> dict[str, Any]:
        attrs = super().get_publish_attrs_from_cmd(cmd)
        attrs.pop(_KEY, None)
        return attrs


class _KeylessBatch(BatchKafkaTelemetrySettingsProvider):
    def get_publish_attrs_from_cmd(self, cmd: Any) -> dict[str, Any]:
        attrs = super().get_publish_attrs_from_cmd(cmd)
        attrs.pop(_KEY, None)
        return attrs


def _keyless_provider_factory(msg: Any) -> KafkaTelemetrySettingsProvider:
    if isinstance(msg, Sequence):
        return _KeylessBatch()  # type: ignore[return-value]
    return _KeylessSingle()


class KeylessKafkaTelemetryMiddleware(KafkaTelemetryMiddleware):
    """FastStream's Kafka telemetry middleware without the record key attribute."""

    def __init__(self, *, tracer_provider: trace.TracerProvider) -> None:
        super().__init__(tracer_provider=tracer_provider, include_messages_counters=False)
        self._settings_provider_factory = _keyless_provider_factory


def build_tracer_provider(
    settings: ServiceSettings, extra_processors: Sequence[SpanProcessor] = ()
) -> trace.TracerProvider:
    """A tracer provider for one service; exports over OTLP/HTTP when an endpoint is set, and
    records nothing when nothing would receive its spans."""
    if not settings.otel_exporter_otlp_endpoint and not extra_processors:
        return trace.NoOpTracerProvider()
    provider = TracerProvider(
        resource=Resource.create(
            {
                "service.name": settings.service_name,
                "service.namespace": "hometeam",
                "service.instance.id": settings.service_instance or "default",
            }
        ),
        sampler=ParentBased(TraceIdRatioBased(settings.otel_traces_sampler_ratio)),
    )
    if settings.otel_exporter_otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    for processor in extra_processors:
        provider.add_span_processor(processor)
    return provider
