"""The MongoDB-compatible store: PyMongo's async API (Motor is end-of-life).

Code stays inside the subset both MongoDB and FerretDB 1.24 serve: no transactions, change
streams or TTL indexes; ``$group`` only with ``$sum``; no projection on findAndModify. Each
document has a single writer (its key's partition owner), so read-modify-write is safe.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from shared.settings import ServiceSettings


def build_mongo_client(settings: ServiceSettings) -> AsyncMongoClient:
    return AsyncMongoClient(
        settings.mongodb_url.get_secret_value(),
        tz_aware=True,
        connect=False,
        serverSelectionTimeoutMS=settings.mongodb_timeout_ms,
        connectTimeoutMS=settings.mongodb_timeout_ms,
        appname=f"hometeam-{settings.service_name}",
    )


def database(client: AsyncMongoClient, settings: ServiceSettings) -> AsyncDatabase:
    return client[settings.mongodb_database]


async def ping(db: AsyncDatabase) -> None:
    """Readiness: a real read on the service's own database (a server-level ping answers even
    when the database itself is stuck)."""
    await db.command("ping")
    await db["readiness"].find_one({}, max_time_ms=2000)


# FerretDB 1.24 on SQLite holds one of a database's 100 pooled SQLite connections per update
# statement until the whole command ends, so one command of more than 100 updates of existing
# documents (or several smaller ones at once) never returns and wedges the database until the
# server restarts. Writes are therefore sent in commands of at most this many operations
# (small enough that the services sharing one database stay under 100 at once).
MAX_WRITES_PER_COMMAND = 20


async def bulk_write_chunked(collection: AsyncCollection, ops: Sequence[Any]) -> None:
    """``bulk_write`` in commands of at most ``MAX_WRITES_PER_COMMAND`` operations, in order."""
    for start in range(0, len(ops), MAX_WRITES_PER_COMMAND):
        await collection.bulk_write(list(ops[start : start + MAX_WRITES_PER_COMMAND]), ordered=False)


# FerretDB 1.24 pushes only an exact ``{_id: <string>}`` filter down to SQLite (and, with the
# lookup index deploy/ferretdb adds, answers it from an index); ``{_id: {"$in": [...]}}``
# scans the whole collection. Against FerretDB, point reads of a batch's documents therefore
# go as concurrent exact-id reads, at most this many in flight (well under FerretDB's 100
# pooled SQLite connections per database). MongoDB answers ``$in`` from the _id index, in
# one round trip per IN_CHUNK ids.
MAX_CONCURRENT_READS = 32
IN_CHUNK = 500
_point_reads: dict[int, bool] = {}  # id(client) → answer (clients compare equal by address)


def needs_point_reads(build_info: dict[str, Any]) -> bool:
    """Whether this server (its ``buildInfo``) must be asked one ``_id`` at a time: FerretDB
    (which reports ``ferretdbVersion``) scans for ``$in``; MongoDB does not."""
    return "ferretdbVersion" in build_info or "ferretdbFeatures" in build_info


async def _uses_point_reads(collection: AsyncCollection) -> bool:
    client = collection.database.client
    known = _point_reads.get(id(client))
    if known is None:
        known = needs_point_reads(await collection.database.command("buildInfo"))
        _point_reads[id(client)] = known
        weakref.finalize(client, _point_reads.pop, id(client), None)
    return known


async def find_by_ids(collection: AsyncCollection, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The documents with these ``_id`` values (absent ones are left out), by id."""
    wanted = list(dict.fromkeys(ids))
    found: dict[str, dict[str, Any]] = {}
    if not wanted:
        return found
    if not await _uses_point_reads(collection):
        for start in range(0, len(wanted), IN_CHUNK):
            async for doc in collection.find({"_id": {"$in": wanted[start : start + IN_CHUNK]}}):
                found[doc["_id"]] = doc
        return found
    for start in range(0, len(wanted), MAX_CONCURRENT_READS):
        docs = await asyncio.gather(*(collection.find_one({"_id": i}) for i in wanted[start : start + MAX_CONCURRENT_READS]))
        found.update((d["_id"], d) for d in docs if d is not None)
    return found


DUPLICATE_KEY = 11000


async def insert_absent(collection: AsyncCollection, docs: list[dict[str, Any]]) -> set[Any]:
    """Insert these documents and return the ``_id`` of those that already existed (their
    insert answered "duplicate key"); any other error is raised. The insert-first idiom: on
    FerretDB one insert command costs less than a single point read, so a batch that mostly
    names new documents claims them all at once and reads only the ones that existed."""
    if not docs:
        return set()
    try:
        await collection.insert_many(docs, ordered=False)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if any(e.get("code") != DUPLICATE_KEY for e in errors):
            raise
        return {docs[e["index"]]["_id"] for e in errors}
    return set()
