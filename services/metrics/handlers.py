"""The metrics service's consumers: lifecycle events and survey answers (keyed by customer),
agent presence (staffed time) and pool status (queues and staffing)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from aiokafka import ConsumerRecord

from shared.contracts.agents import AgentPresenceChanged, Presence
from shared.contracts.pools import PoolStatusChanged
from shared.runtime.decoding import BatchReader
from shared.runtime.owned_cache import OwnedStateCache
from shared.teams import DirectoryWatcher

from services.metrics.kpis import CustomerKpiState, Fact, facts_for, hour_of
from services.metrics.prom import KpiMetrics
from services.metrics.store import KpiStore, bucket_id

Clock = Callable[[], datetime]


class EventsConsumer:
    """Turns conversation events and survey answers into hourly KPI buckets."""

    def __init__(
        self,
        reader: BatchReader,
        store: KpiStore,
        metrics: KpiMetrics,
        customers: OwnedStateCache[CustomerKpiState] | None = None,
        buckets: OwnedStateCache[dict[str, Any]] | None = None,
    ) -> None:
        self.reader = reader
        self.store = store
        self.metrics = metrics
        # Customers and buckets (one writer partition each) this consumer owns, kept between
        # batches; dropped on a rebalance, and a failed batch's are never put back.
        self.customers = customers if customers is not None else OwnedStateCache[CustomerKpiState](0)
        self.buckets = buckets if buckets is not None else OwnedStateCache[dict[str, Any]](0)

    async def handle(self, records: Sequence[ConsumerRecord]) -> None:
        incoming = await self.reader.read(records)
        epoch = (self.customers.epoch, self.buckets.epoch)
        customer_ids = list(dict.fromkeys(i.payload.customer_id for i in incoming))
        cached = self.customers.take(customer_ids)
        states = cached | await self.store.claim_or_load_customers(c for c in customer_ids if c not in cached)
        pending: list[tuple[str, int, Fact]] = []  # (writer, offset, fact)
        for item in incoming:
            state = states[item.payload.customer_id]
            writer = f"{_topic_tag(item.record.topic)}/{item.record.partition}"
            if state.applied.get(writer, -1) >= item.offset:
                continue
            for fact in facts_for(item.payload, state):
                pending.append((writer, item.offset, fact))
            state.applied[writer] = item.offset

        empty = {
            bucket_id(hour_of(f.at), f.team, f.agent, w): {
                "_id": bucket_id(hour_of(f.at), f.team, f.agent, w),
                "hour": hour_of(f.at),
                "team": f.team,
                "agent": f.agent,
                "writer": w,
                "counters": {},
                "applied_offset": -1,
            }
            for w, _, f in pending
        }
        docs = self.buckets.take(empty)
        docs |= await self.store.claim_or_load_buckets({i: d for i, d in empty.items() if i not in docs})
        for doc in docs.values():
            doc["last_offset"] = -1
        counted: list[Fact] = []
        for writer, offset, fact in pending:
            doc = docs[bucket_id(hour_of(fact.at), fact.team, fact.agent, writer)]
            # A record counted into this bucket before a crash is not counted again.
            if offset <= doc["applied_offset"]:
                continue
            doc["counters"][fact.counter] = doc["counters"].get(fact.counter, 0) + fact.amount
            doc["last_offset"] = max(doc["last_offset"], offset)
            counted.append(fact)
        for doc in docs.values():
            doc["applied_offset"] = max(doc["applied_offset"], doc.pop("last_offset", -1))
            doc["last_offset"] = -1
        await self.reader.flush()
        await self.store.save_buckets(docs.values())
        await self.store.save_customers(states)
        self.customers.put_back(states, epoch[0])
        self.buckets.put_back(docs, epoch[1])
        for fact in counted:
            observe(self.metrics, fact)


def _topic_tag(topic: str) -> str:
    # Writers must be stable names without dots (they are part of document ids and labels).
    return topic.replace(".", "_")


def observe(metrics: KpiMetrics, fact: Fact) -> None:
    """Reflect one counted fact in the Prometheus metrics."""
    labels = dict(fact.labels)
    c = fact.counter
    if c == "closed":
        metrics.closed.labels(fact.team, fact.agent, labels["status"]).inc()
    elif c == "messages":
        metrics.messages.labels(fact.team, labels["direction"], labels["channel"]).inc()
    elif c == "turns":
        metrics.turns.labels(fact.team).inc()
    elif c == "repeats":
        metrics.repeats.labels(fact.team).inc()
    elif c == "routed":
        metrics.routed.labels(labels["pool"], fact.team, labels["reason"]).inc()
    elif c.startswith("overflow_"):
        metrics.overflow.labels(fact.team, labels["reason"]).inc()
    elif c == "response_target_missed":
        metrics.response_target_missed.labels(fact.team).inc()
    elif c == "csat_count":
        metrics.csat.labels(fact.team, labels["score"]).inc()
    elif c == "first_response_seconds":
        metrics.first_response.labels(fact.team).observe(fact.amount)
    elif c == "resolution_seconds":
        metrics.resolution.labels(fact.team).observe(fact.amount)


class PresenceConsumer:
    """Agents' staffed time: online (or away) until offline, as intervals in the store and
    seconds on the Prometheus counter."""

    def __init__(self, reader: BatchReader, store: KpiStore, metrics: KpiMetrics, directory: DirectoryWatcher, credited: dict[str, datetime]) -> None:
        self.reader = reader
        self.store = store
        self.metrics = metrics
        self.directory = directory
        self.credited = credited  # agent -> time up to which staffed seconds were counted

    async def handle(self, records: Sequence[ConsumerRecord]) -> None:
        for item in await self.reader.read(records):
            change: AgentPresenceChanged = item.payload
            team = self.directory.current.pool_of_agent(change.agent_id) or "unknown"
            interval = await self.store.open_interval(change.agent_id)
            if change.presence is Presence.OFFLINE:
                if interval is not None and change.changed_at >= interval["start"]:
                    await self.store.end_interval(interval["_id"], change.changed_at)
                    since = self.credited.pop(change.agent_id, interval["start"])
                    self.metrics.staffed.labels(interval["team"], change.agent_id).inc(max(0.0, (change.changed_at - since).total_seconds()))
            elif interval is None:
                await self.store.start_interval(change.agent_id, team, change.changed_at)
                self.credited[change.agent_id] = change.changed_at
        await self.reader.flush()


async def credit_staffed_time(store: KpiStore, metrics: KpiMetrics, credited: dict[str, datetime], now: datetime) -> None:
    """Count the staffed seconds of agents still online up to ``now`` (so the counter moves
    while they work, not only when they sign out)."""
    for interval in await store.open_intervals():
        agent = interval["agent"]
        since = credited.get(agent, max(interval["start"], now))
        if now > since:
            metrics.staffed.labels(interval["team"], agent).inc((now - since).total_seconds())
            credited[agent] = now
        else:
            credited.setdefault(agent, since)


class PoolStatusConsumer:
    """Each pool's latest status: gauges at once, the stored copy (``kpi_pools``, for /kpis and
    the oldest-wait refresh) behind a checkpoint (``shared.runtime.checkpoints``): a status only
    replaces the one before it, so one write per pool per flush keeps the store current without
    a write per record (team-routing publishes one per batch that changes a pool)."""

    def __init__(self, reader: BatchReader, store: KpiStore, metrics: KpiMetrics, clock: Clock) -> None:
        self.reader = reader
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.unstored: dict[str, dict[str, Any]] = {}  # pool → latest status not yet stored
        self.latest: dict[str, dict[str, Any]] = {}  # pool → latest status seen (stored or not)

    async def handle(self, records: Sequence[ConsumerRecord]) -> None:
        """One batch; call under the checkpoint lock (``Checkpointed.run_batch``)."""
        for item in await self.reader.read(records):
            status = item.payload
            self.unstored[status.pool_id] = self.latest[status.pool_id] = {"_id": status.pool_id, **status.model_dump(mode="python")}
            set_pool_gauges(self.metrics, status, self.clock())
        await self.reader.flush()

    def snapshot_state(self) -> Callable[[], Awaitable[None]] | None:
        docs = list(self.unstored.values())
        self.unstored.clear()
        if not docs:
            return None

        async def write() -> None:
            try:
                await self.store.save_pools(docs)
            except BaseException:
                for doc in docs:  # stored next time, unless a newer status came meanwhile
                    self.unstored.setdefault(doc["_id"], doc)
                raise

        return write

    def drop_state(self) -> None:
        self.unstored.clear()


def set_pool_gauges(metrics: KpiMetrics, status: PoolStatusChanged, now: datetime) -> None:
    pool = status.pool_id
    metrics.queue_depth.labels(pool).set(status.queue_depth)
    oldest = (now - status.oldest_waiting_since).total_seconds() if status.oldest_waiting_since else 0.0
    metrics.oldest_wait.labels(pool).set(max(0.0, oldest))
    metrics.agents_online.labels(pool).set(status.agents_online)
    metrics.capacity_online.labels(pool).set(status.capacity_online)
    metrics.load.labels(pool).set(status.load)
    metrics.surging.labels(pool).set(1 if status.surging else 0)


async def refresh_oldest_wait(store: KpiStore, metrics: KpiMetrics, now: datetime, seen: dict[str, dict[str, Any]] | None = None) -> None:
    """Keep each queue's oldest wait growing between status changes (a stuck queue must
    still trip the alert). ``seen``: statuses newer than the stored ones (stored behind)."""
    pools = {p["_id"]: p for p in await store.all_pools()} | (seen or {})
    for pool in pools.values():
        since = pool.get("oldest_waiting_since")
        metrics.oldest_wait.labels(pool["_id"]).set(max(0.0, (now - since).total_seconds()) if since else 0.0)
