"""The store command metrics every service exposes: commands and written documents by
collection and command, counted by the client the service builds, against the real store."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from pymongo import ReplaceOne
from pymongo.errors import DuplicateKeyError, OperationFailure

from shared.runtime.store import build_mongo_client, database
from shared.settings import ServiceSettings

pytestmark = pytest.mark.integration


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_commands_and_written_documents_are_counted_by_collection(infra, mongo_db_name) -> None:
    registry = CollectorRegistry()
    settings = ServiceSettings(service_name="probe", mongodb_url=infra.mongodb_url, mongodb_database=mongo_db_name)
    client = build_mongo_client(settings, registry)
    try:
        db = database(client, settings)
        await db["customers"].insert_many([{"_id": f"c{i}", "n": i} for i in range(5)])
        await db["customers"].bulk_write([ReplaceOne({"_id": f"c{i}"}, {"n": 10 + i}) for i in range(3)])
        assert (await db["customers"].find_one({"_id": "c1"}))["n"] == 11
        await db["journal"].delete_one({"_id": "absent"})
        with pytest.raises(DuplicateKeyError):
            await db["customers"].insert_one({"_id": "c0"})
        with pytest.raises(OperationFailure):
            await db.command("noSuchCommand")
        # (read before the client closes: FerretDB refuses the endSessions a close sends)
        errors = value(registry, "hometeam_store_commands_total", collection="-", command="other", outcome="error")
    finally:
        await client.close()

    assert value(registry, "hometeam_store_documents_written_total", collection="customers", command="insert") == 6
    assert value(registry, "hometeam_store_documents_written_total", collection="customers", command="update") == 3
    assert value(registry, "hometeam_store_documents_written_total", collection="journal", command="delete") == 1
    # A duplicate key is a write error inside a successful command reply: both inserts are "ok".
    assert value(registry, "hometeam_store_commands_total", collection="customers", command="insert", outcome="ok") == 2
    assert value(registry, "hometeam_store_commands_total", collection="customers", command="find", outcome="ok") == 1
    assert value(registry, "hometeam_store_commands_total", collection="customers", command="update", outcome="ok") == 1
    assert errors == 1
    assert value(registry, "hometeam_store_command_seconds_total", collection="customers", command="find") > 0
    # Nothing about a document's content becomes a label.
    labels = {s.labels.get("collection") for m in registry.collect() for s in m.samples if m.name.startswith("hometeam_store")}
    assert labels <= {"customers", "journal", "-"}


async def test_a_client_built_without_a_registry_counts_nothing(infra, mongo_db_name) -> None:
    settings = ServiceSettings(service_name="probe", mongodb_url=infra.mongodb_url, mongodb_database=mongo_db_name)
    client = build_mongo_client(settings)
    try:
        assert client.options.event_listeners == []
    finally:
        await client.close()
