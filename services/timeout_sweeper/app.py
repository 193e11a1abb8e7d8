"""timeout-sweeper: lifecycle deadlines (inactivity, response targets, team hours, callbacks)."""

from __future__ import annotations

from collections.abc import Sequence

from faststream.kafka import KafkaMessage
from opentelemetry.sdk.trace import SpanProcessor

from shared.contracts.registry import CONVERSATION_EVENTS
from shared.runtime.decoding import BatchReader, documented_payloads
from shared.runtime.kafka import batch_subscriber_options, records_of
from shared.runtime.service import Service, assemble, build_runtime
from shared.settings import ServiceSettings


class TimeoutSweeperSettings(ServiceSettings):
    service_name: str = "timeout-sweeper"
    http_port: int = 8084


def create_service(
    settings: TimeoutSweeperSettings | None = None, *, span_processors: Sequence[SpanProcessor] = ()
) -> Service:
    settings = settings or TimeoutSweeperSettings()
    runtime = build_runtime(settings, span_processors=span_processors, description="Lifecycle deadlines")
    reader = BatchReader((CONVERSATION_EVENTS,), runtime.dead_letters, settings.kafka_topic_prefix)

    @runtime.broker.subscriber(
        settings.topic(CONVERSATION_EVENTS.name),
        **batch_subscriber_options(settings),
        title="timeout-sweeper:consume:conversations.events",
        description=CONVERSATION_EVENTS.description,
    )
    async def on_conversation_events(batch: documented_payloads(CONVERSATION_EVENTS), message: KafkaMessage) -> None:  # type: ignore[valid-type]
        # Deadlines are tracked from these events (issue 4); today the consumer validates and
        # dead-letters what it cannot read.
        await reader.read(records_of(message))
        await reader.flush()

    return assemble(runtime, title="hometeam timeout-sweeper", description="Lifecycle deadlines and timers.")


def asyncapi_app():  # type: ignore[no-untyped-def]
    """Factory for ``faststream docs gen --factory``."""
    return create_service().app
