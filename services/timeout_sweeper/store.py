"""Deadline documents and claims.

A deadline is one document per arming (``<kind>:<entity>@<version>``), written and removed by
the consumer that owns the customer, and removed by the sweeper that fired it: no document
is ever updated by two writers, which FerretDB's non-isolated updates could not protect.
A claim is a document whose unique ``_id`` (``<deadline>#<attempt>``) lets exactly one
sweeper replica fire an attempt.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError

from services.timeout_sweeper.deadlines import Arm, Change

DUPLICATE_KEY = 11000


class DeadlineStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.deadlines = db["deadlines"]
        self.claims = db["deadline_claims"]

    async def ensure_indexes(self) -> None:
        await self.deadlines.create_index([("due_at", ASCENDING)])
        await self.deadlines.create_index([("kind", ASCENDING), ("entity", ASCENDING)])
        await self.claims.create_index([("claimed_at", ASCENDING)])

    async def existing(self, kind: str, entities: Iterable[str]) -> set[str]:
        ids = list(set(entities))
        if not ids:
            return set()
        return {d["entity"] async for d in self.deadlines.find({"kind": kind, "entity": {"$in": ids}}, {"entity": 1})}

    async def apply(self, net: dict[tuple[str, str], Change], now: datetime) -> None:
        """Write a batch's net changes: drop superseded armings, insert the new ones."""
        arms = [c for c in net.values() if isinstance(c, Arm)]
        for (kind, entity), change in net.items():
            keep = change.doc_id if isinstance(change, Arm) else None
            query: dict[str, Any] = {"kind": kind, "entity": entity}
            if keep:
                query["_id"] = {"$ne": keep}
            await self.deadlines.delete_many(query)
        if arms:
            await self.insert(arms, now)

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

    async def due(self, now: datetime, limit: int) -> list[dict[str, Any]]:
        cursor = self.deadlines.find({"due_at": {"$lte": now}}).sort([("due_at", ASCENDING), ("_id", ASCENDING)]).limit(limit)
        return [d async for d in cursor]

    async def claim(self, deadline_id: str, attempt: int, owner: str, now: datetime) -> bool:
        try:
            await self.claims.insert_one({"_id": f"{deadline_id}#{attempt}", "claimed_by": owner, "claimed_at": now})
        except DuplicateKeyError:
            return False
        return True

    async def recent_claims(self, claim_ids: list[str], since: datetime) -> set[str]:
        """Which of these claims were made after ``since`` (their holder may still be working)."""
        if not claim_ids:
            return set()
        return {d["_id"] async for d in self.claims.find({"_id": {"$in": claim_ids}, "claimed_at": {"$gt": since}}, {"_id": 1})}

    async def done(self, deadline_ids: list[str]) -> None:
        if deadline_ids:
            await self.deadlines.delete_many({"_id": {"$in": deadline_ids}})

    async def forget_claims_before(self, when: datetime) -> None:
        await self.claims.delete_many({"claimed_at": {"$lt": when}})

    async def count_hours(self, team_id: str) -> int:
        return await self.deadlines.count_documents({"kind": "hours", "entity": team_id})
