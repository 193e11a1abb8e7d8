"""metrics: reads conversation lifecycle and routing decisions and exports the messaging KPIs."""

from __future__ import annotations

from collections.abc import Sequence

from faststream.kafka import KafkaMessage
from opentelemetry.sdk.trace import SpanProcessor
from prometheus_client import Counter

from shared.contracts.registry import CONVERSATION_EVENTS
from shared.runtime.decoding import BatchReader, documented_payloads
from shared.runtime.kafka import batch_subscriber_options, records_of
from shared.runtime.service import Service, assemble, build_runtime
from shared.settings import ServiceSettings


class MetricsSettings(ServiceSettings):
    service_name: str = "metrics"
    http_port: int = 8085


def create_service(settings: MetricsSettings | None = None, *, span_processors: Sequence[SpanProcessor] = ()) -> Service:
    settings = settings or MetricsSettings()
    runtime = build_runtime(settings, span_processors=span_processors, description="Messaging KPIs")
    reader = BatchReader((CONVERSATION_EVENTS,), runtime.dead_letters, settings.kafka_topic_prefix)
    events = Counter(
        "hometeam_conversation_events_total",
        "Conversation lifecycle events seen, by type.",
        ["type"],
        registry=runtime.registry,
    )

    @runtime.broker.subscriber(
        settings.topic(CONVERSATION_EVENTS.name),
        **batch_subscriber_options(settings),
        title="metrics:consume:conversations.events",
        description=CONVERSATION_EVENTS.description,
    )
    async def on_conversation_events(batch: documented_payloads(CONVERSATION_EVENTS), message: KafkaMessage) -> None:  # type: ignore[valid-type]
        for item in await reader.read(records_of(message)):
            events.labels(type(item.payload).__name__).inc()
        await reader.flush()

    return assemble(runtime, title="hometeam metrics", description="Messaging KPIs for teams and agents.")


def asyncapi_app():  # type: ignore[no-untyped-def]
    """Factory for ``faststream docs gen --factory``."""
    return create_service().app
