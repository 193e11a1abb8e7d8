"""The MongoDB-compatible store: PyMongo's async API (Motor is end-of-life).

Code stays inside the subset both MongoDB and FerretDB 1.24 serve: no transactions, change
streams or TTL indexes; ``$group`` only with ``$sum``; no projection on findAndModify. Each
document has a single writer (its key's partition owner), so read-modify-write is safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

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
