"""ingest: channel webhooks and the ``channel.inbound.v1`` consumer that resolves customers."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from opentelemetry.sdk.trace import SpanProcessor
from pydantic import Field, SecretStr

from shared.contracts.channel import ChannelMessagePosted
from shared.contracts.registry import CHANNEL_INBOUND, MESSAGES_RECEIVED
from shared.runtime.decoding import BatchReader, documented_payloads
from shared.runtime.kafka import batch_subscriber_options, current_records, fetch_wait_tuner
from shared.runtime.service import Service, assemble, build_runtime
from shared.settings import ServiceSettings

from services.ingest.handlers import InboundConsumer
from services.ingest.identity import IdentityDirectory
from services.ingest.normalize import address_key
from services.ingest.webhooks import webhook_routes


class IngestSettings(ServiceSettings):
    service_name: str = "ingest"
    http_port: int = 8081
    public_base_url: str | None = Field(
        default=None, description="The URL the SMS provider calls (for signature checks behind a proxy)"
    )
    twilio_auth_token: SecretStr | None = None
    business_chat_jwt_secret: SecretStr | None = None
    business_chat_jwt_audience: str = "hometeam-business-chat"
    app_jwt_secret: SecretStr | None = None
    app_jwt_audience: str = "hometeam-app"
    max_request_bytes: int = Field(default=64 * 1024, ge=1024)
    identity_cache_size: int = Field(default=200_000, ge=0)


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value else None


def create_service(settings: IngestSettings | None = None, *, span_processors: Sequence[SpanProcessor] = ()) -> Service:
    settings = settings or IngestSettings()
    runtime = build_runtime(settings, span_processors=span_processors, description="Channel ingest")
    broker = runtime.broker
    outbox = runtime.outbox("/hometeam/ingest")
    consumer = InboundConsumer(
        BatchReader((CHANNEL_INBOUND,), runtime.dead_letters, settings.kafka_topic_prefix),
        IdentityDirectory(runtime.db, settings.identity_cache_size),
        outbox,
        runtime.tracing,
    )

    runtime.document_publications(CHANNEL_INBOUND, MESSAGES_RECEIVED)

    async def publish_inbound(message: ChannelMessagePosted) -> None:
        # The webhook answers after Kafka has the record (acks=all): nothing accepted is lost.
        webhook_outbox = runtime.outbox("/hometeam/ingest/webhooks")
        # The trace of a customer message starts at the webhook.
        with runtime.tracing.server_span(
            f"POST /webhooks/{message.channel.value}",
            {"http.request.method": "POST", "http.route": f"/webhooks/{message.channel.value}", "messaging.system": "kafka"},
        ):
            await webhook_outbox.send(
                CHANNEL_INBOUND.name,
                address_key(message.channel, message.address),
                message,
                id=str(uuid.uuid4()),
                time=datetime.now(UTC),
            )
            await webhook_outbox.flush()

    subscriber = broker.subscriber(
        settings.topic(CHANNEL_INBOUND.name),
        **batch_subscriber_options(settings),
        title="ingest:consume:channel.inbound",
        description=CHANNEL_INBOUND.description,
    )
    tuner = fetch_wait_tuner(settings, runtime.background, lambda: subscriber.consumer)

    @subscriber
    async def on_channel_inbound(batch: documented_payloads(CHANNEL_INBOUND)) -> None:  # type: ignore[valid-type]
        records = current_records(broker)
        if tuner is not None:
            tuner.note(len(records))
        await consumer.handle(records)

    routes = webhook_routes(
        publish_inbound,
        twilio_auth_token=_secret(settings.twilio_auth_token),
        public_base_url=settings.public_base_url,
        business_chat_secret=_secret(settings.business_chat_jwt_secret),
        business_chat_audience=settings.business_chat_jwt_audience,
        app_secret=_secret(settings.app_jwt_secret),
        app_audience=settings.app_jwt_audience,
        max_request_bytes=settings.max_request_bytes,
    )
    service = assemble(
        runtime,
        title="hometeam ingest",
        description="Channel webhooks and customer identity resolution.",
        routes=routes,
    )
    service.extras["fetch_wait_tuner"] = tuner
    return service


def asyncapi_app():  # type: ignore[no-untyped-def]
    """Factory for ``faststream docs gen --factory``."""
    return create_service().app
