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

from prometheus_client import CollectorRegistry, Counter
from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from shared.settings import ServiceSettings


def build_mongo_client(settings: ServiceSettings, registry: CollectorRegistry | None = None) -> AsyncMongoClient:
    """The service's store client; with a registry, its commands are counted there
    (``StoreCommandMetrics``)."""
    return AsyncMongoClient(
        settings.mongodb_url.get_secret_value(),
        tz_aware=True,
        connect=False,
        serverSelectionTimeoutMS=settings.mongodb_timeout_ms,
        connectTimeoutMS=settings.mongodb_timeout_ms,
        appname=f"hometeam-{settings.service_name}",
        event_listeners=[StoreCommandMetrics(registry)] if registry is not None else [],
    )


# The commands counted by name; any other (createIndexes, buildInfo, ...) as "other".
_COUNTED_COMMANDS = frozenset({"insert", "update", "delete", "find", "getMore", "aggregate", "count", "findAndModify", "ping"})
# The documents (statements) a write command carries, by command.
_WRITE_ITEMS = {"insert": "documents", "update": "updates", "delete": "deletes"}


class StoreCommandMetrics(monitoring.CommandListener):
    """Counts the service's store commands and the documents its writes carry, by collection
    and command, with the time they took: the store load of each service, in its own terms
    (bounded labels: collection and command names come from the code, never from data).

    - ``hometeam_store_commands_total{collection, command, outcome}``
    - ``hometeam_store_command_seconds_total{collection, command}``
    - ``hometeam_store_documents_written_total{collection, command}``: documents inserted,
      update statements (a replace is one), delete statements
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.commands = Counter(
            "hometeam_store_commands_total", "Store commands, by collection, command and outcome.",
            ["collection", "command", "outcome"], registry=registry,
        )
        self.seconds = Counter(
            "hometeam_store_command_seconds_total", "Seconds store commands took (round trip), by collection and command.",
            ["collection", "command"], registry=registry,
        )
        self.written = Counter(
            "hometeam_store_documents_written_total",
            "Documents written: inserted documents, update statements (a replace is one), delete statements.",
            ["collection", "command"], registry=registry,
        )
        self._started: dict[tuple[Any, int], tuple[str, str]] = {}  # (connection, request id) → labels
        self._children: dict[tuple[Any, ...], Any] = {}  # a label lookup costs more than the increment

    def _child(self, metric: Counter, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name = event.command_name
        command = name if name in _COUNTED_COMMANDS else "other"
        target = event.command.get(name)
        collection = target if isinstance(target, str) and name != "ping" else "-"
        items = _WRITE_ITEMS.get(name)
        if items is not None:
            self._child(self.written, collection, command).inc(len(event.command.get(items, ())))
        self._started[(event.connection_id, event.request_id)] = (collection, command)

    def _ended(self, event: monitoring.CommandSucceededEvent | monitoring.CommandFailedEvent, outcome: str) -> None:
        labels = self._started.pop((event.connection_id, event.request_id), None)
        if labels is None:
            return
        self._child(self.commands, *labels, outcome).inc()
        self._child(self.seconds, *labels).inc(event.duration_micros / 1e6)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self._ended(event, "ok")

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._ended(event, "error")


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


async def delete_then_insert_is_cheaper(collection: AsyncCollection) -> bool:
    """Whether rewriting stored documents costs the server less as deletes and one insert
    than as replaces: FerretDB 1.24 (``needs_point_reads``) reads, decodes and rewrites a
    replaced document in a transaction of its own (0.27-0.41 ms of CPU for a ~650-byte
    document in a collection of 50,000), where a delete and a share of a batched insert cost
    0.14-0.16 ms. Not atomic: only for documents something else keeps durable meanwhile."""
    return await _uses_point_reads(collection)


async def queries_scan(collection: AsyncCollection) -> bool:
    """Whether every query but an exact ``_id`` filter scans the collection (FerretDB 1.24,
    ``needs_point_reads``): there one broader query beats several narrow ones."""
    return await _uses_point_reads(collection)


async def create_query_index(collection: AsyncCollection, keys: list[tuple[str, Any]]) -> str | None:
    """Create an index for the queries that filter or sort on ``keys``, unless the server
    answers only an exact ``_id`` filter from an index (FerretDB 1.24, ``needs_point_reads``):
    there it would serve no query and cost every insert and replace (FerretDB CPU per insert
    into 50,000 documents: a transcript line 0.068 ms with its one index, 0.043 without; a
    deadline 0.076 with its two, 0.037 without). Returns the index name, or None."""
    if await _uses_point_reads(collection):
        return None
    return await collection.create_index(keys)


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
