"""metrics: the messaging KPIs per team and agent, on /metrics (Prometheus) and /kpis (JSON)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from opentelemetry.sdk.trace import SpanProcessor
from pydantic import Field

from shared.contracts.registry import AGENT_PRESENCE, CONVERSATION_EVENTS, POOL_STATUS, SURVEY_RESPONSES
from shared.runtime.checkpoints import checkpointed_subscriber
from shared.runtime.decoding import BatchReader, documented_payloads
from shared.runtime.kafka import batch_subscriber_options, client_security_options, current_records
from shared.runtime.service import Service, assemble, build_runtime
from shared.settings import ServiceSettings
from shared.teams import DirectoryWatcher

from services.metrics.api import kpi_routes
from services.metrics.handlers import (
    EventsConsumer,
    PoolStatusConsumer,
    PresenceConsumer,
    credit_staffed_time,
    refresh_oldest_wait,
)
from services.metrics.lag import export_lag
from services.metrics.prom import KpiMetrics
from services.metrics.store import KpiStore

Clock = Callable[[], datetime]
CUSTOMER_INPUTS = (CONVERSATION_EVENTS, SURVEY_RESPONSES)


class MetricsSettings(ServiceSettings):
    service_name: str = "metrics"
    http_port: int = 8085
    teams_config: Path = Path("deploy/teams.yaml")
    teams_reload_interval_s: float = Field(default=5.0, gt=0)
    # Nothing waits on what this service reads by the millisecond (KPIs): an idle
    # broker is polled every 200 ms instead of every 40 (README, CONSUMER_FETCH_MAX_WAIT_MS).
    consumer_fetch_max_wait_ms: int = Field(default=200, ge=0, le=5_000, description="Longest the broker holds a fetch for the min bytes")
    agent_cost_per_hour: float = Field(default=40.0, ge=0, description="Loaded cost of a staffed agent-hour (teams may override)")
    staffed_time_interval_s: float = Field(
        default=15.0, ge=0, description="How often online agents' time and queues' oldest waits are refreshed; 0: only on events"
    )
    consumer_lag_interval_s: float = Field(default=15.0, ge=0, description="How often consumer lag is read; 0: never")
    state_cache_entries: int = Field(
        default=50_000,
        ge=0,
        description="Stored hourly buckets, and conversations whose team and agent are known (for survey answers), kept in memory; 0: none",
    )
    state_flush_interval_s: float = Field(
        default=5.0,
        gt=0,
        description=(
            "How often hourly buckets, the credits of ended conversations and the latest pool statuses are stored (replayed "
            "from the last checkpoint after a crash); /kpis trails by up to this much"
        ),
    )


def wall_clock() -> datetime:
    return datetime.now(UTC)


def create_service(
    settings: MetricsSettings | None = None, *, span_processors: Sequence[SpanProcessor] = (), clock: Clock = wall_clock
) -> Service:
    settings = settings or MetricsSettings()
    runtime = build_runtime(settings, span_processors=span_processors, description="Messaging KPIs")
    directory = DirectoryWatcher(settings.teams_config)
    store = KpiStore(runtime.db)
    metrics = KpiMetrics(runtime.registry)
    for team in directory.current.teams:
        metrics.cost_per_hour.labels(team.id).set(team.cost_per_agent_hour if team.cost_per_agent_hour is not None else settings.agent_cost_per_hour)
    standard_cost = directory.current.standard_pool.cost_per_agent_hour
    metrics.cost_per_hour.labels("standard").set(standard_cost if standard_cost is not None else settings.agent_cost_per_hour)
    credited: dict[str, datetime] = {}
    prefix = settings.kafka_topic_prefix
    events = EventsConsumer(
        BatchReader(CUSTOMER_INPUTS, runtime.dead_letters, prefix), store, metrics, settings.state_cache_entries
    )
    presence = PresenceConsumer(BatchReader((AGENT_PRESENCE,), runtime.dead_letters, prefix), store, metrics, directory, credited)
    pools = PoolStatusConsumer(BatchReader((POOL_STATUS,), runtime.dead_letters, prefix), store, metrics, clock)
    runtime.on_startup.append(store.ensure_indexes)
    runtime.background.append(lambda: directory.watch(settings.teams_reload_interval_s))

    async def expire_counted_events() -> None:
        while True:
            await store.drop_counted_events_before(clock())
            await asyncio.sleep(3600)

    runtime.background.append(expire_counted_events)

    if settings.staffed_time_interval_s > 0:

        async def tick_staffed_time() -> None:
            while True:
                now = clock()
                await credit_staffed_time(store, metrics, credited, now)
                await refresh_oldest_wait(store, metrics, now, pools.latest)
                await asyncio.sleep(settings.staffed_time_interval_s)

        runtime.background.append(tick_staffed_time)
    if settings.consumer_lag_interval_s > 0:
        options = client_security_options(settings)
        runtime.background.append(
            lambda: export_lag(settings.kafka_bootstrap_servers, settings.kafka_group_prefix, metrics, settings.consumer_lag_interval_s, options)
        )
    broker = runtime.broker

    event_checkpoints, events_subscriber = checkpointed_subscriber(
        runtime,
        store.event_checkpoints,
        "kpi_events",
        events,
        settings.state_flush_interval_s,
        *(settings.topic(t.name) for t in CUSTOMER_INPUTS),
        **batch_subscriber_options(settings),
        title="metrics:consume:customer",
        description="Conversation lifecycle events and survey answers, keyed by customer.",
    )

    @events_subscriber
    async def on_customer_records(batch: documented_payloads(*CUSTOMER_INPUTS)) -> None:  # type: ignore[valid-type]
        await event_checkpoints.run_batch(current_records(broker), events.handle)

    @broker.subscriber(
        settings.topic(AGENT_PRESENCE.name),
        **batch_subscriber_options(settings, group_suffix=".presence"),
        title="metrics:consume:agent.presence",
        description="Agents' presence, for staffed hours.",
    )
    async def on_presence(batch: documented_payloads(AGENT_PRESENCE)) -> None:  # type: ignore[valid-type]
        await presence.handle(current_records(broker))

    pool_checkpoints, pools_subscriber = checkpointed_subscriber(
        runtime,
        store.pool_checkpoints,
        "pool_status",
        pools,
        settings.state_flush_interval_s,
        settings.topic(POOL_STATUS.name),
        **batch_subscriber_options(settings, group_suffix=".pools"),
        title="metrics:consume:pools.status",
        description=POOL_STATUS.description,
    )

    @pools_subscriber
    async def on_pool_status(batch: documented_payloads(POOL_STATUS)) -> None:  # type: ignore[valid-type]
        await pool_checkpoints.run_batch(current_records(broker), pools.handle)

    return assemble(
        runtime,
        title="hometeam metrics",
        description="Messaging KPIs for teams and agents.",
        routes=kpi_routes(store, directory, clock, settings.agent_cost_per_hour),
    )


def asyncapi_app():  # type: ignore[no-untyped-def]
    """Factory for ``faststream docs gen --factory``."""
    return create_service().app
