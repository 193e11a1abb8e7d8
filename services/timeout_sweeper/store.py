"""Deadline documents and claims.

A deadline is one document per arming (``<kind>:<entity>@<version>``), written and removed by
the consumer that owns the customer, and removed by the sweeper that fired it: no document
is ever updated by two writers, which FerretDB's non-isolated updates could not protect.
A claim is a document whose unique ``_id`` (``<deadline>#<attempt>``) lets exactly one
sweeper replica fire an attempt.

A head (``deadline_heads``, ``_id`` = ``<kind>:<entity>``) names the current arming of each
kind and entity and when it falls due, so superseding and "is it running" are reads and
deletes by exact ``_id`` (FerretDB answers only those from an index; any other filter scans
the collection), and an arming that is not due yet is known to be running without a read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from pymongo import ASCENDING, DeleteOne, ReplaceOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from shared.runtime.store import DUPLICATE_KEY, bulk_write_chunked, create_query_index, find_by_ids, insert_absent

from services.timeout_sweeper.deadlines import Arm, Change


# A sweeper fires a deadline only once it is due by its own clock; replicas' clocks may differ
# by this much. An arming due later than now + this cannot have fired yet.
CLOCK_SKEW = timedelta(seconds=30)


class Head(NamedTuple):
    """The current arming of a kind and entity ("" for none) and when it falls due (``None``
    when not known: a head stored before heads carried it)."""

    current: str = ""
    due_at: datetime | None = None


NO_HEAD = Head()


def _head(doc: dict[str, Any] | None) -> Head:
    return Head(doc["current"], doc.get("due_at")) if doc is not None else NO_HEAD


class DeadlineStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.deadlines = db["deadlines"]
        self.claims = db["deadline_claims"]
        self.heads = db["deadline_heads"]
        # Told (id, due_at) of every deadline this process stored (the sweep's read-ahead).
        self.armed_listeners: list[Callable[[Iterable[tuple[str, datetime]]], None]] = []

    async def ensure_indexes(self) -> None:
        await create_query_index(self.deadlines, [("due_at", ASCENDING)])
        await create_query_index(self.deadlines, [("kind", ASCENDING), ("entity", ASCENDING)])
        await create_query_index(self.claims, [("claimed_at", ASCENDING)])

    async def existing(self, kind: str, entities: Iterable[str], now: datetime, heads: dict[str, Head] | None = None) -> set[str]:
        """The entities whose ``kind`` deadline is armed and not yet fired. ``heads``: head id
        → head already known; the others are read. A current arming due later than ``now`` +
        ``CLOCK_SKEW`` is running (no sweeper fires it before then); the others are read."""
        known = dict(heads or {})
        wanted = {f"{kind}:{e}": e for e in entities}
        await self._read_heads(known, wanted)
        running = {e for h, e in wanted.items() if known[h].current and known[h].due_at is not None and known[h].due_at > now + CLOCK_SKEW}
        unsure = [known[h].current for h, e in wanted.items() if known[h].current and e not in running]
        armed = await find_by_ids(self.deadlines, unsure)
        return running | {doc["entity"] for doc in armed.values()}

    async def _read_heads(self, known: dict[str, Head], wanted: Iterable[str]) -> None:
        """Add the stored head (or ``NO_HEAD``) of each wanted head id not in ``known``."""
        unknown = [h for h in wanted if h not in known]
        read = await find_by_ids(self.heads, unknown)
        known.update((h, _head(read.get(h))) for h in unknown)

    async def apply(self, net: dict[tuple[str, str], Change], now: datetime, heads: dict[str, Head] | None = None) -> dict[str, Head]:
        """Write a batch's net changes: drop superseded armings, insert the new ones, then
        point the heads at them. A crash anywhere in between replays the batch to the same end:
        the old arming is gone before a head stops naming it. ``heads``: head id → head
        already known (the others are read); returns the heads after."""
        known = dict(heads or {})
        wanted = [f"{kind}:{entity}" for kind, entity in net]
        await self._read_heads(known, wanted)
        superseded: list[Any] = []
        head_ops: list[Any] = []
        new_heads: list[dict[str, Any]] = []  # none stored: inserted (cheaper than an upsert)
        for (kind, entity), change in net.items():
            head_id = f"{kind}:{entity}"
            after = Head(change.doc_id, change.due_at) if isinstance(change, Arm) else NO_HEAD
            keep, current = after.current, known[head_id].current
            if current and current != keep:
                superseded.append(DeleteOne({"_id": current}))
            if keep and not current:
                new_heads.append({"_id": head_id, "current": keep, "due_at": after.due_at})
            elif keep and current != keep:
                head_ops.append(ReplaceOne({"_id": head_id}, {"current": keep, "due_at": after.due_at}, upsert=True))
            elif not keep and current:
                head_ops.append(DeleteOne({"_id": head_id}))
            known[head_id] = after
        if superseded:
            await bulk_write_chunked(self.deadlines, superseded)
        arms = [c for c in net.values() if isinstance(c, Arm)]
        if arms:
            await self.insert(arms, now)
        # A head that exists after all (a replay after a crash stored it) is replaced, after
        # the arming it names, if another, is dropped.
        existed = await insert_absent(self.heads, [dict(h) for h in new_heads])
        if existed:
            stored = await find_by_ids(self.heads, existed)
            keep = {h["_id"]: h["current"] for h in new_heads}
            stale = [DeleteOne({"_id": d["current"]}) for i, d in stored.items() if d.get("current") and d["current"] != keep[i]]
            if stale:
                await bulk_write_chunked(self.deadlines, stale)
        head_ops += [ReplaceOne({"_id": h["_id"]}, {"current": h["current"], "due_at": h["due_at"]}, upsert=True) for h in new_heads if h["_id"] in existed]
        if head_ops:
            await bulk_write_chunked(self.heads, head_ops)
        return {h: known[h] for h in wanted}

    async def insert(self, arms: list[Arm], now: datetime) -> None:
        docs = [
            {"_id": a.doc_id, "kind": a.kind, "entity": a.entity, "due_at": a.due_at, "data": a.data, "armed_at": now}
            for a in arms
        ]
        try:
            await self.deadlines.insert_many(docs, ordered=False)
        except BulkWriteError as exc:  # already armed (a replay, or another replica's hours row)
            if any(e.get("code") != DUPLICATE_KEY for e in exc.details.get("writeErrors", [])):
                raise
        armed = [(d["_id"], d["due_at"]) for d in docs]
        for listener in self.armed_listeners:
            listener(armed)

    async def due(self, until: datetime, limit: int) -> list[dict[str, Any]]:
        """The first ``limit`` deadlines due at or before ``until``, earliest first. A range
        query: the store may scan the whole collection for it (FerretDB does)."""
        cursor = self.deadlines.find({"due_at": {"$lte": until}}).sort([("due_at", ASCENDING), ("_id", ASCENDING)]).limit(limit)
        return [d async for d in cursor]

    async def get(self, deadline_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """These deadlines as stored now (fired or superseded ones are absent)."""
        return await find_by_ids(self.deadlines, deadline_ids)

    async def claim(self, attempts: dict[str, int], owner: str, now: datetime) -> set[str]:
        """Claim these deadlines (deadline id → attempt) in one insert command; returns the
        ones this owner claimed (for the others another replica's claim of the same attempt
        came first: the unique ``_id`` settles it)."""
        docs = [{"_id": f"{deadline_id}#{attempt}", "claimed_by": owner, "claimed_at": now} for deadline_id, attempt in attempts.items()]
        taken = await insert_absent(self.claims, docs)
        return {deadline_id for deadline_id, attempt in attempts.items() if f"{deadline_id}#{attempt}" not in taken}

    async def recent_claims(self, claim_ids: list[str], since: datetime) -> set[str]:
        """Which of these claims were made after ``since`` (their holder may still be working)."""
        claims = await find_by_ids(self.claims, claim_ids)
        return {i for i, d in claims.items() if d["claimed_at"] > since}

    async def done(self, deadline_ids: list[str]) -> None:
        await bulk_write_chunked(self.deadlines, [DeleteOne({"_id": i}) for i in deadline_ids])

    async def forget_claims_before(self, when: datetime) -> None:
        await self.claims.delete_many({"claimed_at": {"$lt": when}})

    async def count_hours(self, team_id: str) -> int:
        return await self.deadlines.count_documents({"kind": "hours", "entity": team_id})
