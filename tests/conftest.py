"""Test infrastructure: the real Kafka broker and MongoDB-compatible store.

Where they come from, in order:
1. ``KAFKA_BOOTSTRAP_SERVERS`` and ``MONGODB_URL`` from the environment (``make test`` sets
   them to the local stack it started; point them at any existing servers);
2. testcontainers, when a Docker engine answers a ping;
3. the local stack (``scripts/stack.sh up``), started here and stopped at the end.

Integration and e2e tests never skip: if the servers cannot be had, they fail. With
``HOMETEAM_REQUIRE_INTEGRATION=1`` (set by ``make test``), the run also fails if no
integration test ran or any was skipped.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Infra:
    kafka: str
    mongodb_url: str
    source: str


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:
        return False


def _parse_env_lines(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        if key and value:
            out[key.strip()] = value.strip().strip("'\"")
    return out


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    kafka, mongo = os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), os.environ.get("MONGODB_URL")
    if kafka and mongo:
        yield Infra(kafka, mongo, "environment")
        return
    if _docker_answers():
        from testcontainers.community.kafka import KafkaContainer
        from testcontainers.community.mongodb import MongoDbContainer

        with KafkaContainer("confluentinc/cp-kafka:7.9.0").with_kraft() as k, MongoDbContainer("mongo:8.0") as m:
            yield Infra(k.get_bootstrap_server(), m.get_connection_url() + "/?directConnection=true", "testcontainers")
        return
    script = REPO / "scripts" / "stack.sh"
    was_running = subprocess.run(["bash", str(script), "status"], capture_output=True).returncode == 0
    up = subprocess.run(["bash", str(script), "up"], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.fail(f"could not start the local stack:\n{up.stderr[-3000:]}", pytrace=False)
    env = _parse_env_lines(up.stdout)
    try:
        yield Infra(env["KAFKA_BOOTSTRAP_SERVERS"], env["MONGODB_URL"], "local stack")
    finally:
        if not was_running:
            subprocess.run(["bash", str(script), "down"], capture_output=True)


@pytest.fixture
def run_id() -> str:
    """A random id per test: topic prefixes, database names, customer ids."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def topic_prefix(infra: Infra, run_id: str) -> AsyncIterator[str]:
    """Fresh topics for one test, so no test sees another's records; deleted afterwards (a
    full run would otherwise leave thousands of partitions, each holding open files)."""
    from shared.runtime.topics import delete_topics_with_prefix, ensure_topics

    prefix = f"t{run_id}."
    await ensure_topics(infra.kafka, prefix=prefix)
    yield prefix
    await delete_topics_with_prefix(infra.kafka, prefix)


@pytest.fixture
async def mongo_db_name(infra: Infra, run_id: str) -> AsyncIterator[str]:
    from pymongo import AsyncMongoClient

    name = f"hometeam_test_{run_id}"
    yield name
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url)
    try:
        await client.drop_database(name)
    finally:
        await client.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.fspath)
        if "/integration/" in path:
            item.add_marker(pytest.mark.integration)
        if "/e2e/" in path:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.integration)


_integration = {"passed": 0, "failed": 0, "skipped": 0}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "integration" not in report.keywords:
        return
    if report.skipped:
        _integration["skipped"] += 1
    elif report.when == "call":
        _integration["passed" if report.passed else "failed"] += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("HOMETEAM_REQUIRE_INTEGRATION") != "1":
        return
    ran = _integration["passed"] + _integration["failed"]
    if _integration["skipped"] or ran == 0:
        print(
            f"\nHOMETEAM_REQUIRE_INTEGRATION: {ran} integration tests ran, "
            f"{_integration['skipped']} skipped; integration tests must run and never skip."
        )
        session.exitstatus = 1
