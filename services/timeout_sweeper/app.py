"""timeout-sweeper: lifecycle deadlines (inactivity, response targets, team hours, callbacks),
armed from conversation events and fired by a sweep loop that is safe to run in several
replicas."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from opentelemetry.sdk.trace import SpanProcessor
from pydantic import Field

from shared.contracts.registry import CONVERSATION_EVENTS, LIFECYCLE_COMMANDS, ROUTING_COMMANDS
from shared.runtime.decoding import BatchReader, documented_payloads
from shared.runtime.kafka import batch_subscriber_options, current_records
from shared.runtime.owned_cache import OwnedStateCache, invalidate_on_rebalance
from shared.runtime.service import Service, assemble, build_runtime
from shared.settings import ServiceSettings
from shared.teams import DirectoryWatcher

from services.timeout_sweeper.handlers import DeadlineTracker
from services.timeout_sweeper.store import DeadlineStore, Head
from services.timeout_sweeper.sweep import Sweeper

Clock = Callable[[], datetime]


class TimeoutSweeperSettings(ServiceSettings):
    service_name: str = "timeout-sweeper"
    http_port: int = 8084
    teams_config: Path = Path("deploy/teams.yaml")
    teams_reload_interval_s: float = Field(default=5.0, gt=0)
    # Nothing waits on what this service reads by the millisecond (deadlines fall due minutes ahead): an idle
    # broker is polled every 200 ms instead of every 40 (README, CONSUMER_FETCH_MAX_WAIT_MS).
    consumer_fetch_max_wait_ms: int = Field(default=200, ge=0, le=5_000, description="Longest the broker holds a fetch for the min bytes")
    sweep_interval_s: float = Field(default=1.0, gt=0, description="Pause between sweeps when nothing is due")
    sweep_batch_size: int = Field(default=200, ge=1, le=10_000, description="Deadlines claimed per sweep")
    claim_lease_s: float = Field(default=30.0, gt=0, description="After this, a claim whose sweeper died is taken over")
    sweep_read_ahead_s: float = Field(
        default=10.0,
        gt=0,
        description="The shortest window (and time between scheduled reads) of the sweep's reads of due deadlines; "
        "reads also follow a rebalance of the sweeper's group and a failed sweep",
    )
    # A store that scans for the read (FerretDB: ~33 µs per stored deadline) makes the window
    # grow so that reads take about 2% of the time (services/timeout_sweeper/sweep.py).
    sweep_read_ahead_max_s: float = Field(
        default=120.0,
        gt=0,
        description="The longest window of the sweep's reads, reached when a read takes 2.4 s (not below SWEEP_READ_AHEAD_S); "
        "a deadline armed by a replica whose sweeps fail can fire up to the window late",
    )
    state_cache_heads: int = Field(
        default=100_000, ge=0, description="Deadline heads (current arming per kind and entity) kept in memory between batches"
    )


def wall_clock() -> datetime:
    return datetime.now(UTC)


def create_service(
    settings: TimeoutSweeperSettings | None = None,
    *,
    span_processors: Sequence[SpanProcessor] = (),
    clock: Clock = wall_clock,
) -> Service:
    settings = settings or TimeoutSweeperSettings()
    runtime = build_runtime(settings, span_processors=span_processors, description="Lifecycle deadlines")
    directory = DirectoryWatcher(settings.teams_config)
    store = DeadlineStore(runtime.db)
    outbox = runtime.outbox("/hometeam/timeout-sweeper")
    heads = OwnedStateCache[Head](settings.state_cache_heads)
    tracker = DeadlineTracker(
        BatchReader((CONVERSATION_EVENTS,), runtime.dead_letters, settings.kafka_topic_prefix), store, directory, clock, heads
    )
    sweeper = Sweeper(
        store,
        outbox,
        directory,
        clock,
        owner=runtime.settings.service_instance,
        registry=runtime.registry,
        batch_size=settings.sweep_batch_size,
        lease=timedelta(seconds=settings.claim_lease_s),
        read_ahead=timedelta(seconds=settings.sweep_read_ahead_s),
        read_ahead_max=timedelta(seconds=settings.sweep_read_ahead_max_s),
    )
    runtime.on_startup.append(store.ensure_indexes)
    runtime.background.append(lambda: directory.watch(settings.teams_reload_interval_s))
    runtime.background.append(lambda: sweeper.run(settings.sweep_interval_s))
    broker = runtime.broker

    runtime.document_publications(LIFECYCLE_COMMANDS, ROUTING_COMMANDS)

    @broker.subscriber(
        settings.topic(CONVERSATION_EVENTS.name),
        **batch_subscriber_options(settings),
        # A replica that left may have held deadlines in memory that nobody else read yet.
        listener=invalidate_on_rebalance(heads, on_assigned=sweeper.ahead.request_read),
        title="timeout-sweeper:consume:conversations.events",
        description=CONVERSATION_EVENTS.description,
    )
    async def on_conversation_events(batch: documented_payloads(CONVERSATION_EVENTS)) -> None:  # type: ignore[valid-type]
        await tracker.handle(current_records(broker))

    service = assemble(runtime, title="hometeam timeout-sweeper", description="Lifecycle deadlines and timers.")
    service.extras["sweeper"] = sweeper
    return service


def asyncapi_app():  # type: ignore[no-untyped-def]
    """Factory for ``faststream docs gen --factory``."""
    return create_service().app
