"""The metrics service's consumers: lifecycle events and survey answers (keyed by customer),
agent presence (staffed time) and pool status (queues and staffing)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from aiokafka import ConsumerRecord

from shared.contracts import conversations as ev
from shared.contracts.agents import AgentPresenceChanged, Presence
from shared.contracts.pools import PoolStatusChanged
from shared.contracts.surveys import SurveyAnswered
from shared.runtime.decoding import BatchReader
from shared.teams import DirectoryWatcher

from services.metrics.kpis import Credit, Fact, credit_of, facts_for, hour_of
from services.metrics.prom import KpiMetrics
from services.metrics.store import KpiStore, bucket_doc, bucket_id, empty_bucket

Clock = Callable[[], datetime]


class EventsConsumer:
    """Turns conversation events and survey answers into hourly KPI buckets.

    The events carry what the KPIs need to know of each customer's history (worked out by
    conversation-state), so this consumer keeps nothing per customer. What it keeps: the
    hourly buckets it owns, and who holds each recent conversation (for survey answers), in
    memory and stored behind checkpoints (``shared.runtime.checkpoints``); after a crash or
    rebalance it replays from the last checkpoint, and stored applied offsets per bucket skip
    what the store already holds. An event conversation-state published again after a crash
    (same id, a later offset) is counted once (``KpiStore.repeated_events``); the Prometheus
    metrics reflect each record at most once per process (``observed``)."""

    def __init__(self, reader: BatchReader, store: KpiStore, metrics: KpiMetrics, max_clean: int = 50_000) -> None:
        self.reader = reader
        self.store = store
        self.metrics = metrics
        self.max_clean = max_clean  # stored buckets and known credits kept in memory (least recently used go first)
        self.buckets: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.dirty_buckets: set[str] = set()
        self.credits: OrderedDict[str, Credit] = OrderedDict()  # conversation → who holds or held it
        self.unstored_credits: dict[str, Credit] = {}  # of conversations that ended, not stored yet
        # writer → last offset reflected in this process's Prometheus metrics; kept across
        # rewinds so that replayed records are not counted there twice.
        self.observed: dict[str, int] = {}

    async def handle(self, records: Sequence[ConsumerRecord]) -> None:
        """One batch; call under the checkpoint lock (``Checkpointed.run_batch``)."""
        incoming = await self.reader.read(records)
        first: dict[str, Any] = {}
        for item in incoming:
            first.setdefault(item.envelope.id, item)
        # What each event contributes (a survey answer's facts wait for its credit). Only an
        # event that contributes a fact or a credit is recorded as counted: reading one that
        # contributes neither again changes nothing (57% of the events in make bench's load:
        # conversations opened, lines before a placement, preference changes).
        facts: dict[str, list[Fact]] = {
            event_id: facts_for(i.payload) for event_id, i in first.items() if not isinstance(i.payload, SurveyAnswered)
        }
        repeated = await self.store.repeated_events(
            [
                (event_id, _position(i.record), i.envelope.time)
                for event_id, i in first.items()
                if isinstance(i.payload, SurveyAnswered) or facts[event_id] or credit_of(i.payload) is not None
            ]
        )
        # Not ``set - self.credits.keys()``: that walks every held credit (up to ``max_clean``)
        # in each batch; it was ~10% of this service's CPU under load.
        surveyed = {
            i.payload.conversation_id
            for i in incoming
            if isinstance(i.payload, SurveyAnswered) and i.payload.conversation_id not in self.credits
        }
        stored_credits = await self.store.load_credits(surveyed) if surveyed else {}
        pending: list[tuple[str, int, Fact]] = []  # (writer, offset, fact)
        for item in incoming:
            if first[item.envelope.id] is not item or item.envelope.id in repeated:
                continue  # published again: counted where it was first read
            writer = f"{_topic_tag(item.record.topic)}/{item.record.partition}"
            payload = item.payload
            if isinstance(payload, SurveyAnswered):
                credit = self.credits.get(payload.conversation_id) or stored_credits.get(payload.conversation_id)
                contributed = facts_for(payload, credit)
            else:
                held = credit_of(payload)
                if held is not None:
                    self._credit(*held, ended=isinstance(payload, (ev.ConversationResolved, ev.ConversationClosed)))
                contributed = facts[item.envelope.id]
            for fact in contributed:
                pending.append((writer, item.offset, fact))

        keys = [bucket_id(hour_of(f.at), f.team, w) for w, _, f in pending]
        ids = dict(zip(keys, ((w, f) for w, _, f in pending)))
        absent = {i: empty_bucket(i, hour_of(f.at), f.team, w) for i, (w, f) in ids.items() if i not in self.buckets}
        if absent:
            self.buckets.update(await self.store.claim_or_load_buckets(absent))
        counted: list[tuple[str, int, Fact]] = []
        batch_marks: dict[str, int] = {}  # bucket → last offset counted into it by this batch
        for key, (writer, offset, fact) in zip(keys, pending):
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
        for item in incoming:
            writer = f"{_topic_tag(item.record.topic)}/{item.record.partition}"
            self.observed[writer] = max(self.observed.get(writer, -1), item.offset)

    def _credit(self, conversation_id: str, credit: Credit, ended: bool) -> None:
        self.credits[conversation_id] = credit
        self.credits.move_to_end(conversation_id)
        if ended:
            self.unstored_credits[conversation_id] = credit

    def snapshot_state(self) -> Callable[[], Awaitable[None]] | None:
        """The changed buckets and the credits of ended conversations as documents now (under
        the batch lock), and how to store them; stored entries beyond ``max_clean`` leave
        memory."""
        # No write is in flight now (one at a time): what is not dirty is stored.
        _evict_clean(self.buckets, self.dirty_buckets, self.max_clean)
        while len(self.credits) > self.max_clean:
            self.credits.popitem(last=False)  # unstored ones stay in unstored_credits
        buckets = [bucket_doc(self.buckets[b]) for b in self.dirty_buckets if b in self.buckets]
        credits, self.unstored_credits = self.unstored_credits, {}
        dirty = set(self.dirty_buckets)
        self.dirty_buckets.clear()
        if not credits and not buckets:
            return None

        async def write() -> None:
            try:
                await self.store.save_buckets(buckets)
                await self.store.save_credits(credits)
            except BaseException:
                self.dirty_buckets.update(dirty)  # stored next time, with whatever they hold by then
                for conversation, credit in credits.items():
                    self.unstored_credits.setdefault(conversation, credit)
                raise

        return write

    def drop_state(self) -> None:
        self.buckets.clear()
        self.dirty_buckets.clear()
        self.credits.clear()
        self.unstored_credits.clear()


def _position(record: ConsumerRecord) -> str:
    return f"{_topic_tag(record.topic)}/{record.partition}/{record.offset}"


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
        metrics.closed.labels(fact.team, fact.agent, labels["status"]).inc(fact.amount)
    elif c == "messages":
        metrics.messages.labels(fact.team, labels["direction"], labels["channel"]).inc(fact.amount)
    elif c == "turns":
        metrics.turns.labels(fact.team).inc(fact.amount)
    elif c == "repeats":
        metrics.repeats.labels(fact.team).inc(fact.amount)
    elif c == "routed":
        metrics.routed.labels(labels["pool"], fact.team, labels["reason"]).inc(fact.amount)
    elif c.startswith("overflow_"):
        metrics.overflow.labels(fact.team, labels["reason"]).inc(fact.amount)
    elif c == "response_target_missed":
        metrics.response_target_missed.labels(fact.team).inc(fact.amount)
    elif c == "csat_count":
        metrics.csat.labels(fact.team, labels["score"]).inc(fact.amount)
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
