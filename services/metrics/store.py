"""The metrics service's documents; each has a single writer, so plain replaces are safe:

- ``kpi_buckets``: hourly counters per (team, source partition), each agent's apart inside
  (``agents``: a list of ``{"agent", "counters"}``), with the offset of the last record counted
  in each (a replay after a crash never counts twice). One document per team rather than per
  agent: a flush replaces a few documents instead of one per active agent (a replace costs
  FerretDB ~20 inserts). Stored compact (``shared.runtime.compact``: ``hour``, ``team`` and
  ``writer`` kept as fields for the queries, the agents and the offset in the blob): FerretDB
  re-encodes every field of a replaced document, and a bucket of 50 agents (~10 KB of
  fields) cost it ~1.4 ms of CPU per replace as fields, ~0.23 ms compact. Documents stored
  before (as fields; or one per agent: ``agent``, ``counters``) are still read; stored
  behind checkpoints (``kpi_event_checkpoints``);
- ``kpi_counted_<yyyymmdd>``: one small document per counted event (one that contributes a
  fact or a credit; ``_id`` = event id, ``pos`` = where it was read), in a collection per day
  of the event's time: conversation-state
  publishes a batch's events again with the same ids after a crash, and an id stored at
  another position is such a repeat (counted once). Inserted before the batch's facts are
  counted; collections older than ``COUNTED_EVENT_DAYS`` are dropped;
- ``kpi_conversation_credits``: who ended each conversation (team, agent), for its survey
  answers; stored behind the same checkpoints;
- ``kpi_presence``: agents' staffed intervals (online until offline);
- ``kpi_pools``: each pool's latest queue and staffing, stored behind checkpoints
  (``kpi_pool_checkpoints``).

The metrics service keeps nothing per customer: the events carry what the KPIs need
(``shared.contracts.conversations``). Databases of earlier versions may still hold
``kpi_customers`` and ``kpi_customer_claims``; nothing reads them any more.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, ReplaceOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from shared.runtime.compact import compact_document, expand_document
from shared.runtime.store import bulk_write_chunked, create_query_index, find_by_ids, insert_absent

from services.metrics.kpis import Credit

COUNTED_EVENTS_PREFIX = "kpi_counted_"
COUNTED_EVENT_DAYS = 8  # a repeat comes minutes after its original; a backlog may take days


# Formatting a time costs more than the rest of counting a fact (~1.5 µs a strftime, a few
# per fact): the few names a stream of events needs are remembered (cleared past 4,096).
_DAY_NAMES: dict[int, str] = {}
_HOUR_TEXTS: dict[tuple[datetime, timedelta | None], str] = {}
_REMEMBERED = 4_096


def counted_events_collection(at: datetime) -> str:
    """The collection of the UTC day of ``at``."""
    day = int(at.timestamp() // 86_400)
    name = _DAY_NAMES.get(day)
    if name is None:
        if len(_DAY_NAMES) >= _REMEMBERED:
            _DAY_NAMES.clear()
        name = _DAY_NAMES[day] = COUNTED_EVENTS_PREFIX + at.astimezone(UTC).strftime("%Y%m%d")
    return name


def bucket_id(hour: datetime, team: str, writer: str) -> str:
    key = (hour, hour.utcoffset())  # equal instants in other offsets print other hours
    text = _HOUR_TEXTS.get(key)
    if text is None:
        if len(_HOUR_TEXTS) >= _REMEMBERED:
            _HOUR_TEXTS.clear()
        text = _HOUR_TEXTS[key] = hour.strftime("%Y-%m-%dT%H")
    return f"{text}|{team}|{writer}"


def empty_bucket(bucket: str, hour: datetime, team: str, writer: str) -> dict[str, Any]:
    """A bucket in memory: ``agents`` maps agent → counters."""
    return {"_id": bucket, "hour": hour, "team": team, "writer": writer, "agents": {}, "applied_offset": -1}


# A bucket's fields kept beside the blob: what ``buckets_between`` queries, and its writer.
BUCKET_FIELDS = ("hour", "team", "writer")


def bucket_doc(bucket: dict[str, Any]) -> dict[str, Any]:
    """The stored form of a bucket in memory (a copy: later counts do not reach it)."""
    agents = [{"agent": a, "counters": c} for a, c in bucket["agents"].items()]
    return compact_document({**bucket, "agents": agents}, BUCKET_FIELDS)


def bucket_from_doc(doc: dict[str, Any]) -> dict[str, Any]:
    expanded = expand_document(doc)  # (once: ``agent_counters`` of the stored form would unpack it again)
    return {**expanded, "agents": {a: dict(c) for a, c in agent_counters(expanded)}}


def agent_counters(doc: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """(agent, counters) of a stored bucket, of any form it was stored in (compact or as
    fields, per team; or per agent as before)."""
    if "blob" in doc:
        doc = expand_document(doc)
    if "agents" in doc:
        return [(a["agent"], a["counters"]) for a in doc["agents"]]
    return [(doc["agent"], doc["counters"])]


class KpiStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.db = db
        self.buckets = db["kpi_buckets"]
        self.credits = db["kpi_conversation_credits"]
        self.presence = db["kpi_presence"]
        self.pools = db["kpi_pools"]
        self.pool_checkpoints = db["kpi_pool_checkpoints"]  # see shared.runtime.checkpoints
        self.event_checkpoints = db["kpi_event_checkpoints"]

    async def ensure_indexes(self) -> None:
        await create_query_index(self.buckets, [("hour", ASCENDING), ("team", ASCENDING)])
        await create_query_index(self.presence, [("agent", ASCENDING), ("end", ASCENDING)])

    # counted events ------------------------------------------------------------------------
    async def repeated_events(self, events: Sequence[tuple[str, str, datetime]]) -> set[str]:
        """Of these (event id, position, event time), the ids counted before at another
        position (an event published again): insert-first, one insert command per day of
        events; only the ids that existed are read."""
        by_day: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for event_id, pos, at in events:
            by_day[counted_events_collection(at)].append({"_id": event_id, "pos": pos})
        repeated: set[str] = set()
        for name, docs in by_day.items():
            collection = self.db[name]
            existed = await insert_absent(collection, docs)
            if existed:
                stored = await find_by_ids(collection, existed)
                mine = {d["_id"]: d["pos"] for d in docs}
                repeated |= {i for i, doc in stored.items() if doc.get("pos") != mine[i]}
        return repeated

    async def drop_counted_events_before(self, now: datetime) -> list[str]:
        """Drop the per-day collections of counted events older than ``COUNTED_EVENT_DAYS``."""
        oldest_kept = counted_events_collection(now - timedelta(days=COUNTED_EVENT_DAYS))
        names = [n for n in await self.db.list_collection_names() if n.startswith(COUNTED_EVENTS_PREFIX) and n < oldest_kept]
        for name in names:
            await self.db.drop_collection(name)
        return sorted(names)

    # conversation credits ------------------------------------------------------------------
    async def load_credits(self, conversation_ids: Iterable[str]) -> dict[str, Credit]:
        return {i: (d["team"], d["agent"]) for i, d in (await find_by_ids(self.credits, conversation_ids)).items()}

    async def save_credits(self, credits: dict[str, Credit]) -> None:
        """Insert-first (a conversation ends once, mostly); one that existed is replaced."""
        docs = [{"_id": c, "team": team, "agent": agent} for c, (team, agent) in credits.items()]
        existed = await insert_absent(self.credits, docs)
        ops = [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs if d["_id"] in existed]
        if ops:
            await bulk_write_chunked(self.credits, ops)

    # buckets -----------------------------------------------------------------------------
    async def load_buckets(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """These buckets as stored, in their in-memory form (absent ones left out)."""
        return {i: bucket_from_doc(d) for i, d in (await find_by_ids(self.buckets, ids)).items()}

    async def claim_or_load_buckets(self, empty: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """These buckets (in-memory form), insert-first: each ``empty`` bucket (no counters,
        nothing applied: the same as no bucket) is inserted; those that existed answer with a
        duplicate key and are read. Returns every bucket by id."""
        if not empty:
            return {}
        existed = await insert_absent(self.buckets, [bucket_doc(d) for d in empty.values()])
        found = {i: {**d, "agents": {a: dict(c) for a, c in d["agents"].items()}} for i, d in empty.items()}
        if existed:
            found |= await self.load_buckets(existed)
        return found

    async def save_buckets(self, docs: Iterable[dict[str, Any]]) -> None:
        """Store buckets given in their stored form (``bucket_doc``)."""
        ops = [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs]
        if ops:
            await bulk_write_chunked(self.buckets, ops)

    async def buckets_between(self, start: datetime, end: datetime, team: str | None) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"hour": {"$gte": start, "$lt": end}}
        if team:
            query["team"] = team
        return [expand_document(d) async for d in self.buckets.find(query)]

    # presence ----------------------------------------------------------------------------
    async def open_interval(self, agent: str) -> dict[str, Any] | None:
        return await self.presence.find_one({"agent": agent, "end": None})

    async def start_interval(self, agent: str, team: str, start: datetime) -> None:
        try:
            await self.presence.insert_one({"_id": f"{agent}@{start.isoformat()}", "agent": agent, "team": team, "start": start, "end": None})
        except DuplicateKeyError:
            return  # already started: a replay of the same sign-in

    async def end_interval(self, interval_id: str, end: datetime) -> None:
        await self.presence.update_one({"_id": interval_id}, {"$set": {"end": end}})

    async def intervals_overlapping(self, start: datetime, end: datetime) -> list[dict[str, Any]]:
        return [d async for d in self.presence.find({"start": {"$lt": end}, "$or": [{"end": None}, {"end": {"$gt": start}}]})]

    async def open_intervals(self) -> list[dict[str, Any]]:
        return [d async for d in self.presence.find({"end": None})]

    # pools -------------------------------------------------------------------------------
    async def save_pools(self, docs: Iterable[dict[str, Any]]) -> None:
        ops = [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs]
        if ops:
            await bulk_write_chunked(self.pools, ops)

    async def all_pools(self) -> list[dict[str, Any]]:
        return [d async for d in self.pools.find({})]
