"""The MongoDB-compatible store: PyMongo's async API (Motor is end-of-life).

Code stays inside the subset both MongoDB and FerretDB 1.24 serve: no transactions, change
streams or TTL indexes; ``$group`` only with ``$sum``; no projection on findAndModify. Each
document has a single writer (its key's partition owner), so read-modify-write is safe.
"""

from __future__ import annotations

from pymongo import AsyncMongoClient
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
