"""The metrics service's documents; each has a single writer, so plain replaces are safe:

- ``kpi_buckets``: hourly counters per (team, source partition), each agent's apart inside
  (``agents``: a list of ``{"agent", "counters"}``), with the offset of the last record counted
  in each (a replay after a crash never counts twice). One document per team rather than per
  agent: a flush replaces a few documents instead of one per active agent (a replace costs
  FerretDB ~20 inserts). Documents stored before (one per agent: ``agent``, ``counters``) are
  still read;
- ``kpi_customers``: per-customer tracking needed to derive facts (turns, first response,
  repeat contacts), with applied offsets; read only by ``_id``, so stored compact (one
  compressed blob, ``shared.runtime.compact``: FerretDB inserts it for a third and replaces it
  for about 60% of what the same state costs as fields);
- ``kpi_customer_claims``: one empty document per customer the service has met, inserted
  first (a duplicate key says "known: read its state"), so a new customer's state is
  inserted when first stored instead of claimed and then replaced (a replace costs FerretDB
  ~20 inserts);
- both stored behind checkpoints (``kpi_event_checkpoints``);
- ``kpi_presence``: agents' staffed intervals (online until offline);
- ``kpi_pools``: each pool's latest queue and staffing, stored behind checkpoints
  (``kpi_pool_checkpoints``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, ReplaceOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from shared.runtime.compact import compact_document, expand_document
from shared.runtime.store import bulk_write_chunked, find_by_ids, insert_absent

from services.metrics.kpis import CustomerKpiState, TrackedConversation


CLAIMS_BACKFILLED = "customer_claims_backfilled"  # kpi_meta: every stored customer has a claim


def bucket_id(hour: datetime, team: str, writer: str) -> str:
    return f"{hour.strftime('%Y-%m-%dT%H')}|{team}|{writer}"


def empty_bucket(bucket: str, hour: datetime, team: str, writer: str) -> dict[str, Any]:
    """A bucket in memory: ``agents`` maps agent → counters."""
    return {"_id": bucket, "hour": hour, "team": team, "writer": writer, "agents": {}, "applied_offset": -1}


def bucket_doc(bucket: dict[str, Any]) -> dict[str, Any]:
    """The stored form of a bucket in memory (a copy: later counts do not reach it)."""
    agents = [{"agent": a, "counters": dict(c)} for a, c in bucket["agents"].items()]
    return {**bucket, "agents": agents}


def bucket_from_doc(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "agents": dict(agent_counters(doc))}


def agent_counters(doc: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """(agent, counters) of a stored bucket, of either form (per team, or per agent as stored
    before)."""
    if "agents" in doc:
        return [(a["agent"], a["counters"]) for a in doc["agents"]]
    return [(doc["agent"], doc["counters"])]


class KpiStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.buckets = db["kpi_buckets"]
        self.customers = db["kpi_customers"]
        self.customer_claims = db["kpi_customer_claims"]
        self.meta = db["kpi_meta"]
        self.presence = db["kpi_presence"]
        self.pools = db["kpi_pools"]
        self.pool_checkpoints = db["kpi_pool_checkpoints"]  # see shared.runtime.checkpoints
        self.event_checkpoints = db["kpi_event_checkpoints"]

    async def ensure_indexes(self) -> None:
        await self.buckets.create_index([("hour", ASCENDING), ("team", ASCENDING)])
        await self.presence.create_index([("agent", ASCENDING), ("end", ASCENDING)])
        await self.backfill_customer_claims()

    async def backfill_customer_claims(self) -> None:
        """Give every customer stored before claims were kept apart a claim (once per
        database; repeatable if interrupted: the marker is written last)."""
        if await self.meta.find_one({"_id": CLAIMS_BACKFILLED}) is not None:
            return
        batch: list[dict[str, Any]] = []
        async for doc in self.customers.find({}, {"_id": 1}):
            batch.append({"_id": doc["_id"]})
            if len(batch) == 1000:
                await insert_absent(self.customer_claims, batch)
                batch = []
        await insert_absent(self.customer_claims, batch)
        await insert_absent(self.meta, [{"_id": CLAIMS_BACKFILLED}])

    # customers ---------------------------------------------------------------------------
    async def load_customers(self, ids: Iterable[str]) -> dict[str, CustomerKpiState]:
        """The stored states of these customers (those without one are left out)."""
        states: dict[str, CustomerKpiState] = {}
        for stored in (await find_by_ids(self.customers, ids)).values():
            doc = expand_document(stored)
            states[doc["_id"]] = CustomerKpiState(
                conversations={k: TrackedConversation(**v) for k, v in doc.get("conversations", {}).items()},
                last_resolved=doc.get("last_resolved"),
                applied={a["key"]: a["offset"] for a in doc.get("applied", [])},
                recent_ids=list(doc.get("recent_ids", [])),
            )
        return states

    async def claim_or_load_customers(self, ids: Iterable[str]) -> tuple[dict[str, CustomerKpiState], set[str]]:
        """Like ``load_customers``, but insert-first: a claim is inserted for every customer;
        those that already had one answer with a duplicate key and their state is read. On
        FerretDB one insert command costs less than a single point read, and most customers a
        batch names for the first time are new. Returns the states and which of them have a
        stored state document (a claimed customer has none until its state is first stored:
        the same as an empty state)."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return {}, set()
        existed = await insert_absent(self.customer_claims, [{"_id": cid} for cid in wanted])
        states = {cid: CustomerKpiState() for cid in wanted}
        stored = await self.load_customers(existed) if existed else {}
        return states | stored, set(stored)

    async def save_customers(self, states: dict[str, CustomerKpiState], new: Iterable[str] = ()) -> None:
        await self.save_customer_docs([customer_doc(cid, s) for cid, s in states.items()], new)

    async def save_customer_docs(self, docs: Iterable[dict[str, Any]], new: Iterable[str] = ()) -> None:
        """Store these states (compact): those in ``new`` (no state document yet) are inserted,
        the others (and a new one that exists after all) replaced."""
        docs = [compact_document(d) for d in docs]
        fresh = set(new)
        existed = await insert_absent(self.customers, [d for d in docs if d["_id"] in fresh])
        ops = [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs if d["_id"] not in fresh or d["_id"] in existed]
        if ops:
            await bulk_write_chunked(self.customers, ops)

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
        found = {i: bucket_from_doc(bucket_doc(d)) for i, d in empty.items()}
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
        return [d async for d in self.buckets.find(query)]

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


def customer_doc(customer_id: str, state: CustomerKpiState) -> dict[str, Any]:
    """The stored form of a customer's tracking state (a copy: later changes do not reach it)."""
    return {
        "_id": customer_id,
        "conversations": {k: asdict(v) for k, v in state.conversations.items()},
        "last_resolved": dict(state.last_resolved) if state.last_resolved is not None else None,
        "applied": [{"key": k, "offset": v} for k, v in state.applied.items()],
        "recent_ids": list(state.recent_ids),
    }
