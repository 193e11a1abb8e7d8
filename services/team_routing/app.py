"""team-routing: decides, for every conversation that needs a place, the pool (home team or
standard pool) and the agent, and keeps each pool's agents, loads and queue."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from opentelemetry.sdk.trace import SpanProcessor
from pydantic import Field

from shared.contracts.registry import AGENT_PRESENCE, POOL_STATUS, ROUTING_COMMANDS, ROUTING_DECISIONS
from prometheus_client import Histogram

from shared.runtime.decoding import BatchReader, documented_payloads
from shared.runtime.http import LATENCY_BUCKETS
from shared.runtime.kafka import batch_subscriber_options, current_records
from shared.runtime.checkpoints import checkpointed_subscriber
from shared.runtime.service import Service, assemble, build_runtime
from shared.settings import ServiceSettings
from shared.teams import DirectoryWatcher

from services.team_routing.handlers import PoolConsumer, PresenceForwarder
from services.team_routing.store import PoolStore


class TeamRoutingSettings(ServiceSettings):
    service_name: str = "team-routing"
    http_port: int = 8082
    teams_config: Path = Path("deploy/teams.yaml")
    teams_reload_interval_s: float = Field(default=5.0, gt=0)
    # The routing commands wait for their decision, and come at a fraction of the message rate
    # (a fetch of them never fills 64 KB): polled every 10 ms instead of the service's 40
    # (measured: ~15 ms less p50 to the decision at 20 msg/s, +0.02 ms of team-routing's CPU
    # per message at 1,000, +0.03 idle cores).
    routing_commands_fetch_max_wait_ms: int = Field(
        default=10, ge=0, le=5_000, description="Longest the broker holds a fetch of routing commands for the min bytes"
    )
    state_flush_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="How often pool state is stored (kept in memory between; replayed from the last checkpoint after a crash)",
    )


def create_service(settings: TeamRoutingSettings | None = None, *, span_processors: Sequence[SpanProcessor] = ()) -> Service:
    settings = settings or TeamRoutingSettings()
    runtime = build_runtime(settings, span_processors=span_processors, description="Routing to home teams")
    directory = DirectoryWatcher(settings.teams_config)
    outbox = runtime.outbox("/hometeam/team-routing")
    store = PoolStore(runtime.db)
    pools = PoolConsumer(
        BatchReader((ROUTING_COMMANDS,), runtime.dead_letters, settings.kafka_topic_prefix),
        store,
        outbox,
        directory,
        runtime.tracing,
        latency=Histogram(
            "hometeam_routing_decision_latency_seconds",
            "From a customer message's publish on channel.inbound.v1 to its routing decision (new conversations).",
            buckets=LATENCY_BUCKETS,
            registry=runtime.registry,
        ),
    )
    presence = PresenceForwarder(
        BatchReader((AGENT_PRESENCE,), runtime.dead_letters, settings.kafka_topic_prefix), outbox, directory, runtime.tracing
    )
    runtime.background.append(lambda: directory.watch(settings.teams_reload_interval_s))
    broker = runtime.broker

    runtime.document_publications(ROUTING_DECISIONS, ROUTING_COMMANDS, POOL_STATUS)

    checkpointed, commands_subscriber = checkpointed_subscriber(
        runtime,
        store.checkpoints,
        "pools",
        pools,
        settings.state_flush_interval_s,
        settings.topic(ROUTING_COMMANDS.name),
        **{**batch_subscriber_options(settings), "fetch_max_wait_ms": settings.routing_commands_fetch_max_wait_ms},
        title="team-routing:consume:routing.commands",
        description=ROUTING_COMMANDS.description,
    )

    @commands_subscriber
    async def on_routing_commands(batch: documented_payloads(ROUTING_COMMANDS)) -> None:  # type: ignore[valid-type]
        await checkpointed.run_batch(current_records(broker), pools.handle, confirm_outputs=True)

    @broker.subscriber(
        settings.topic(AGENT_PRESENCE.name),
        **batch_subscriber_options(settings, group_suffix=".presence"),
        title="team-routing:consume:agent.presence",
        description=AGENT_PRESENCE.description,
    )
    async def on_agent_presence(batch: documented_payloads(AGENT_PRESENCE)) -> None:  # type: ignore[valid-type]
        await presence.handle(current_records(broker))

    return assemble(
        runtime,
        title="hometeam team-routing",
        description="Routes conversations to the customer's home team, or the standard pool by rule.",
    )


def asyncapi_app():  # type: ignore[no-untyped-def]
    """Factory for ``faststream docs gen --factory``."""
    return create_service().app
