"""The metrics service's consumers: lifecycle events and survey answers (keyed by customer),
agent presence (staffed time) and pool status (queues and staffing)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from aiokafka import ConsumerRecord

from shared.contracts.agents import AgentPresenceChanged, Presence
from shared.contracts.pools import PoolStatusChanged
from shared.runtime.decoding import BatchReader
from shared.teams import DirectoryWatcher

from services.metrics.kpis import CustomerKpiState, Fact, facts_for, hour_of, seen_before
from services.metrics.prom import KpiMetrics
from services.metrics.store import KpiStore, bucket_doc, bucket_id, customer_doc, empty_bucket

Clock = Callable[[], datetime]


class EventsConsumer:
    """Turns conversation events and survey answers into hourly KPI buckets.

    The customers' tracking state and the buckets this consumer owns stay in memory and are
    stored behind checkpoints (``shared.runtime.checkpoints``): a customer or bucket changed
    by several batches between two stores is written once, and a new one is inserted once
    instead of inserted and then replaced. After a crash or rebalance the consumer replays
    from the last checkpoint; stored applied offsets (per customer, per bucket) skip what the
    store already holds, and the Prometheus metrics reflect each record at most once per
    process (``observed``)."""

    def __init__(self, reader: BatchReader, store: KpiStore, metrics: KpiMetrics, max_clean: int = 50_000) -> None:
        self.reader = reader
        self.store = store
        self.metrics = metrics
        self.max_clean = max_clean  # stored entries kept in memory (least recently used go first)
        self.customers: OrderedDict[str, CustomerKpiState] = OrderedDict()
        self.buckets: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.dirty_customers: set[str] = set()
        self.unstored_customers: set[str] = set()  # in memory, no state document yet: inserted when stored
        self.dirty_buckets: set[str] = set()
        # writer → last offset reflected in this process's Prometheus metrics; kept across
        # rewinds so that replayed records are not counted there twice.
        self.observed: dict[str, int] = {}

    async def handle(self, records: Sequence[ConsumerRecord]) -> None:
        """One batch; call under the checkpoint lock (``Checkpointed.run_batch``)."""
        incoming = await self.reader.read(records)
        customer_ids = list(dict.fromkeys(i.payload.customer_id for i in incoming))
        missing = [c for c in customer_ids if c not in self.customers]
        if missing:
            loaded, stored = await self.store.claim_or_load_customers(missing)
            self.customers.update(loaded)
            self.unstored_customers.update(loaded.keys() - stored)
        states = self.customers
        pending: list[tuple[str, int, Fact]] = []  # (writer, offset, fact)
        for item in incoming:
            customer_id = item.payload.customer_id
            state = states[customer_id]
            states.move_to_end(customer_id)
            writer = f"{_topic_tag(item.record.topic)}/{item.record.partition}"
            if state.applied.get(writer, -1) >= item.offset:
                continue
            if seen_before(state, item.envelope.id):
                state.applied[writer] = item.offset
                self.dirty_customers.add(customer_id)
                continue
            for fact in facts_for(item.payload, state):
                pending.append((writer, item.offset, fact))
            state.applied[writer] = item.offset
            self.dirty_customers.add(customer_id)

        ids = {bucket_id(hour_of(f.at), f.team, w): (w, f) for w, _, f in pending}
        absent = {i: empty_bucket(i, hour_of(f.at), f.team, w) for i, (w, f) in ids.items() if i not in self.buckets}
        if absent:
            self.buckets.update(await self.store.claim_or_load_buckets(absent))
        counted: list[tuple[str, int, Fact]] = []
        batch_marks: dict[str, int] = {}  # bucket → last offset counted into it by this batch
        for writer, offset, fact in pending:
            key = bucket_id(hour_of(fact.at), fact.team, writer)
            doc = self.buckets[key]
            # A record counted into this bucket before (stored before a crash) is not counted again.
            if offset <= doc["applied_offset"]:
                continue
            counters = doc["agents"].setdefault(fact.agent, {})
            counters[fact.counter] = counters.get(fact.counter, 0) + fact.amount
            batch_marks[key] = max(batch_marks.get(key, -1), offset)
            counted.append((writer, offset, fact))
        for key, offset in batch_marks.items():
            self.buckets[key]["applied_offset"] = offset
            self.buckets.move_to_end(key)
            self.dirty_buckets.add(key)
        await self.reader.flush()
        for writer, offset, fact in counted:
            if offset > self.observed.get(writer, -1):
                observe(self.metrics, fact)
        for writer, offset, _ in pending:
            self.observed[writer] = max(self.observed.get(writer, -1), offset)

    def snapshot_state(self) -> Callable[[], Awaitable[None]] | None:
        """The changed customers and buckets as documents now (under the batch lock), and how
        to store them; stored entries beyond ``max_clean`` leave memory."""
        # No write is in flight now (one at a time): what is not dirty is stored.
        for evicted in _evict_clean(self.customers, self.dirty_customers, self.max_clean):
            self.unstored_customers.discard(evicted)
        _evict_clean(self.buckets, self.dirty_buckets, self.max_clean)
        customers = [customer_doc(c, self.customers[c]) for c in self.dirty_customers if c in self.customers]
        buckets = [bucket_doc(self.buckets[b]) for b in self.dirty_buckets if b in self.buckets]
        new = {c for c in self.dirty_customers if c in self.unstored_customers}
        dirty = (set(self.dirty_customers), set(self.dirty_buckets))
        self.dirty_customers.clear()
        self.dirty_buckets.clear()
        if not customers and not buckets:
            return None

        async def write() -> None:
            try:
                # Buckets first: a customer stored without the counts its facts made would
                # skip those records on a replay.
                await self.store.save_buckets(buckets)
                await self.store.save_customer_docs(customers, new)
                self.unstored_customers -= new
            except BaseException:
                self.dirty_customers.update(dirty[0])  # stored next time, with whatever they hold by then
                self.dirty_buckets.update(dirty[1])
                raise

        return write

    def drop_state(self) -> None:
        self.customers.clear()
        self.buckets.clear()
        self.dirty_customers.clear()
        self.dirty_buckets.clear()
        self.unstored_customers.clear()


def _evict_clean(entries: OrderedDict[str, Any], dirty: set[str], keep: int) -> list[str]:
    """Forget the least recently used stored entries beyond ``keep`` (never a dirty one);
    returns their keys."""
    excess = len(entries) - keep
    if excess <= 0:
        return []
    victims: list[str] = []
    for key in entries:
        if key not in dirty:
            victims.append(key)
            if len(victims) == excess:
                break
    for key in victims:
        del entries[key]
    return victims


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
