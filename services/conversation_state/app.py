"""conversation-state: one continuous conversation per customer, agent actions, lifecycle
events, and the read API for agent desktops."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from opentelemetry.sdk.trace import SpanProcessor
from pydantic import Field, SecretStr

from shared.contracts.registry import (
    AGENT_ACTIONS,
    CONVERSATION_EVENTS,
    CUSTOMER_COMMANDS,
    LIFECYCLE_COMMANDS,
    MESSAGES_OUTBOUND,
    MESSAGES_RECEIVED,
    ROUTING_COMMANDS,
    ROUTING_DECISIONS,
)
from prometheus_client import Counter, Histogram

from shared.runtime.decoding import BatchReader, documented_payloads
from shared.runtime.http import LATENCY_BUCKETS
from shared.runtime.phases import BatchPhases
from shared.runtime.kafka import batch_subscriber_options, current_records, fetch_wait_tuner
from shared.runtime.checkpoints import CheckpointMetrics
from shared.runtime.service import Service, assemble, build_runtime
from shared.settings import ServiceSettings
from shared.teams import DirectoryWatcher

from services.conversation_state.handlers import BATCH_PHASES, ConversationConsumer
from services.conversation_state.inactivity import InactivityPolicy
from services.conversation_state.lifecycle import Rules
from services.conversation_state.read_api import command_routes, read_routes
from services.conversation_state.store import ConversationStore
from services.conversation_state.write_behind import WRITE_SLICE, JournaledCustomers

INPUTS = (MESSAGES_RECEIVED, AGENT_ACTIONS, ROUTING_DECISIONS, CUSTOMER_COMMANDS, LIFECYCLE_COMMANDS)


class ConversationStateSettings(ServiceSettings):
    service_name: str = "conversation-state"
    http_port: int = 8083
    teams_config: Path = Path("deploy/teams.yaml")
    teams_reload_interval_s: float = Field(default=5.0, gt=0)
    reopen_window_minutes: int = Field(default=60, ge=0, description="A resolved conversation reopens within this")
    read_api_token: SecretStr | None = Field(default=None, description="Bearer token the read API requires, if set")
    inactivity_default_s: int = Field(default=24 * 3600, ge=60, description="Timeout until a customer's replies are known")
    inactivity_min_s: int = Field(default=30 * 60, ge=60)
    inactivity_max_s: int = Field(default=72 * 3600, ge=60)
    inactivity_multiplier: float = Field(default=3.0, gt=0)
    inactivity_percentile: float = Field(default=0.9, gt=0, le=1)
    inactivity_min_samples: int = Field(default=3, ge=1)
    callback_priority: int = Field(default=5, ge=0, le=9)
    state_cache_customers: int = Field(
        default=20_000, ge=0, description="Stored customers whose state stays in memory between batches (0: none kept once stored)"
    )
    state_max_unstored_customers: int = Field(
        default=20_000,
        ge=1,
        description=(
            "Customers with changes not yet written to their collections, or in the write in flight, before the consumer "
            "stops taking input until they are (backpressure: a store slower than the input leaves the backlog in Kafka, "
            "not in memory)"
        ),
    )
    state_write_slice: int = Field(
        default=WRITE_SLICE,
        ge=1,
        le=10_000,
        description=(
            "Customers a write behind makes documents for and stores at a time; each slice's customers count as stored "
            "as it lands"
        ),
    )
    state_flush_interval_s: float = Field(
        default=1.0,
        gt=0,
        description=(
            "How old a customer's oldest unwritten change gets before the customer and its conversations are written to "
            "their collections (checked every half interval); until then a batch's changes are durable in the journal, and "
            "another replica's read API may trail by up to one and a half intervals"
        ),
    )

    def inactivity_policy(self) -> InactivityPolicy:
        return InactivityPolicy(
            default=timedelta(seconds=self.inactivity_default_s),
            minimum=timedelta(seconds=self.inactivity_min_s),
            maximum=timedelta(seconds=self.inactivity_max_s),
            multiplier=self.inactivity_multiplier,
            percentile=self.inactivity_percentile,
            min_samples=self.inactivity_min_samples,
        )


def create_service(
    settings: ConversationStateSettings | None = None, *, span_processors: Sequence[SpanProcessor] = ()
) -> Service:
    settings = settings or ConversationStateSettings()
    runtime = build_runtime(settings, span_processors=span_processors, description="Conversation state and read API")
    directory = DirectoryWatcher(settings.teams_config)
    store = ConversationStore(runtime.db)
    memory = JournaledCustomers(
        store,
        settings.state_flush_interval_s,
        settings.state_cache_customers,
        CheckpointMetrics(runtime.registry, "conversations", backpressure=True),
        max_unstored=settings.state_max_unstored_customers,
        write_slice=settings.state_write_slice,
    )
    consumer = ConversationConsumer(
        reader=BatchReader(INPUTS, runtime.dead_letters, settings.kafka_topic_prefix),
        store=store,
        outbox=runtime.outbox("/hometeam/conversation-state"),
        tracing=runtime.tracing,
        directory=directory,
        memory=memory,
        partition_ends=lambda partitions: subscriber.consumer.end_offsets(partitions),
        phases=BatchPhases(runtime.registry, BATCH_PHASES),
        loaded=Counter(
            "hometeam_state_customers_loaded_total",
            "Customers conversation-state's batches took, by where their state came from: memory (kept since stored or "
            "changed, STATE_CACHE_CUSTOMERS), store (read), new (known to have nothing stored).",
            ["source"],
            registry=runtime.registry,
        ),
        latency=Histogram(
            "hometeam_message_stored_latency_seconds",
            "From a customer message's publish on channel.inbound.v1 to its stored conversation update.",
            buckets=LATENCY_BUCKETS,
            registry=runtime.registry,
        ),
        rules=Rules(
            directory=directory.current,
            reopen_window=timedelta(minutes=settings.reopen_window_minutes),
            inactivity=settings.inactivity_policy(),
            callback_priority=settings.callback_priority,
        ),
    )
    runtime.on_startup.append(store.ensure_indexes)
    runtime.background.append(lambda: directory.watch(settings.teams_reload_interval_s))
    runtime.background.append(memory.flush_when_due)
    broker = runtime.broker

    runtime.document_publications(CONVERSATION_EVENTS, ROUTING_COMMANDS, MESSAGES_OUTBOUND)

    subscriber = broker.subscriber(
        *(settings.topic(t.name) for t in INPUTS),
        **batch_subscriber_options(settings),
        listener=memory.rebalance_listener(),
        title="conversation-state:consume",
        description="Customer messages, agent actions, routing decisions and customer commands, keyed by customer.",
    )

    memory.consumer = lambda: subscriber.consumer
    tuner = fetch_wait_tuner(settings, runtime.background, lambda: subscriber.consumer)

    @subscriber
    async def on_customer_records(batch: documented_payloads(*INPUTS)) -> None:  # type: ignore[valid-type]
        records = current_records(broker)
        if tuner is not None:
            tuner.note(len(records))
        await consumer.handle(records)

    token = settings.read_api_token.get_secret_value() if settings.read_api_token else None
    commands = runtime.outbox("/hometeam/conversation-state/api")
    service = assemble(
        runtime,
        title="hometeam conversation-state",
        description="One continuous conversation per customer; agent actions; lifecycle events.",
        routes=[*read_routes(store, directory, token, memory), *command_routes(commands, token)],
    )
    service.extras["fetch_wait_tuner"] = tuner
    return service


def asyncapi_app():  # type: ignore[no-untyped-def]
    """Factory for ``faststream docs gen --factory``."""
    return create_service().app
