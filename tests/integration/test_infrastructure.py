"""The foundation on the real servers: a consumer group commits offsets after handling, the
store answers through AsyncMongoClient, and every service's /readyz checks both for real."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from faststream.kafka import KafkaMessage
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient

from services.conversation_state.app import ConversationStateSettings
from services.conversation_state.app import create_service as conversation_state
from services.ingest.app import IngestSettings
from services.ingest.app import create_service as ingest
from services.metrics.app import MetricsSettings
from services.metrics.app import create_service as metrics
from services.team_routing.app import TeamRoutingSettings
from services.team_routing.app import create_service as team_routing
from services.timeout_sweeper.app import TimeoutSweeperSettings
from services.timeout_sweeper.app import create_service as timeout_sweeper
from shared.runtime.kafka import MissingTopics, batch_subscriber_options, build_broker, records_of
from shared.settings import ServiceSettings
from tests.support import eventually, running, service_settings

REPO = Path(__file__).resolve().parents[2]

SERVICES = [
    (ingest, IngestSettings),
    (team_routing, TeamRoutingSettings),
    (conversation_state, ConversationStateSettings),
    (timeout_sweeper, TimeoutSweeperSettings),
    (metrics, MetricsSettings),
]


async def test_consumer_group_round_trip_commits_offsets_after_handling(infra, topic_prefix):
    settings = service_settings(ServiceSettings, infra, topic_prefix, "unused", service_name="round-trip")
    topic = settings.topic("messages.outbound.v1")
    broker = build_broker(settings, metrics_registry=CollectorRegistry(), tracer_provider=TracerProvider())
    handled: list[bytes] = []

    @broker.subscriber(topic, **batch_subscriber_options(settings))
    async def handle(batch: list[bytes], message: KafkaMessage) -> None:
        handled.extend(r.value for r in records_of(message))

    payloads = [f"record-{i}-{uuid.uuid4().hex}".encode() for i in range(5)]
    async with broker:
        await broker.start()
        for i, value in enumerate(payloads):
            await broker.publish(value, topic=topic, key=f"customer-{i}".encode())

        await eventually(lambda: asyncio.sleep(0, result=len(handled) >= len(payloads)), what="all records handled")

        probe = AIOKafkaConsumer(bootstrap_servers=infra.kafka, group_id=settings.group_id, enable_auto_commit=False)
        await probe.start()
        try:
            partitions = [TopicPartition(topic, p) for p in probe.partitions_for_topic(topic) or range(6)]

            async def committed_total() -> int | None:
                total = 0
                for tp in partitions:
                    total += await probe.committed(tp) or 0
                return total if total == len(payloads) else None

            assert await eventually(committed_total, what="offsets committed") == len(payloads)
        finally:
            await probe.stop()
    assert sorted(handled) == sorted(payloads)


async def test_async_mongo_client_writes_and_reads_the_store(infra, mongo_db_name):
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True)
    try:
        collection = client[mongo_db_name]["probe"]
        doc_id = uuid.uuid4().hex
        await collection.insert_one({"_id": doc_id, "team": "pnw-seattle", "n": 3})
        await collection.update_one({"_id": doc_id}, {"$inc": {"n": 2}})
        found = await collection.find_one({"_id": doc_id})
        assert found == {"_id": doc_id, "team": "pnw-seattle", "n": 5}
        await collection.create_index("team", unique=False)
        assert [d["_id"] async for d in collection.find({"team": "pnw-seattle"})] == [doc_id]
    finally:
        await client.close()


@pytest.mark.parametrize(("factory", "settings_cls"), SERVICES, ids=[s[1].__name__ for s in SERVICES])
async def test_every_service_is_ready_against_the_real_servers(infra, topic_prefix, mongo_db_name, factory, settings_cls):
    service = factory(service_settings(settings_cls, infra, topic_prefix, mongo_db_name))
    async with running(service) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ready", "checks": {"kafka": "ok", "store": "ok"}}
        scraped = await http.get("/metrics")
        assert scraped.status_code == 200
        assert scraped.headers["content-type"].startswith("text/plain")
        promtool = shutil.which("promtool")
        assert promtool, "promtool is missing: run scripts/prometheus_tools.sh (make test does)"
        lint = subprocess.run([promtool, "check", "metrics"], input=scraped.text, capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr


async def test_readyz_reports_an_unreachable_store(infra, topic_prefix):
    unreachable = type(infra)(infra.kafka, "mongodb://127.0.0.1:9/?directConnection=true", "nowhere")
    # ingest needs nothing from the store at start-up, so it starts and reports the store down.
    settings = service_settings(IngestSettings, unreachable, topic_prefix, "unreachable", mongodb_timeout_ms=300)
    async with running(ingest(settings)) as http:
        ready = await http.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["kafka"] == "ok"
    assert ready.json()["checks"]["store"].startswith("failed")


async def test_a_service_whose_topics_are_missing_names_them_and_does_not_start(infra, mongo_db_name):
    prefix = f"missing{uuid.uuid4().hex[:8]}."
    settings = service_settings(MetricsSettings, infra, prefix, mongo_db_name, startup_topics_wait_s=1)
    with pytest.raises(MissingTopics) as failed:
        async with running(metrics(settings)):
            pass
    reads = ["agent.presence.v1", "conversations.events.v1", "pools.status.v1", "surveys.responses.v1"]
    expected = sorted(prefix + t for r in reads for t in (r, r + ".dlq"))  # and the dead-letter topics
    assert f"topics missing after 1 s: {', '.join(expected)} " in str(failed.value)


def process_env(infra, database: str, **overrides: str) -> dict[str, str]:
    """The environment of a service started as its own process against the test stack."""
    return {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")},
        "KAFKA_BOOTSTRAP_SERVERS": infra.kafka,
        "MONGODB_URL": infra.mongodb_url,
        "MONGODB_DATABASE": database,
        "HTTP_PORT": "0",
        "PYTHONPATH": str(REPO),
        **overrides,
    }


def sigterm_while_starting(env: dict[str, str], log: Path, waiting: str, settle_s: float = 0.0) -> int:
    """Start metrics as a process, send SIGTERM once its log shows ``waiting`` (and
    ``settle_s`` more), and return its exit code: within 30 s, or the test fails."""
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.metrics"], cwd=REPO, env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while waiting not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert waiting in log.read_text()
        time.sleep(settle_s)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_service_waiting_for_its_topics_stops_on_sigterm(infra, mongo_db_name, tmp_path):
    """uvicorn acts on a signal only once start-up is over; the wait for topics ends on it
    (not after the 600 s wait, nor aiokafka's 40 s per topic)."""
    env = process_env(infra, mongo_db_name, KAFKA_TOPIC_PREFIX=f"missing{uuid.uuid4().hex[:8]}.", STARTUP_TOPICS_WAIT_S="600")
    log = tmp_path / "metrics.log"
    assert sigterm_while_starting(env, log, "waiting up to 600 s for topics") != 0
    assert "cannot start: stopped while waiting for topics to exist" in log.read_text()


def test_a_service_waiting_for_the_store_stops_on_sigterm(infra, mongo_db_name, tmp_path):
    """A store that does not answer keeps the start-up's index creation waiting up to
    MONGODB_TIMEOUT_MS (here 10 minutes); a SIGTERM meanwhile ends it at once, saying so."""
    # nothing listens at 127.0.0.1:9
    env = process_env(infra, mongo_db_name, MONGODB_URL="mongodb://127.0.0.1:9/?directConnection=true", MONGODB_TIMEOUT_MS="600000")
    log = tmp_path / "metrics.log"
    assert sigterm_while_starting(env, log, "Waiting for application startup", settle_s=0.5) != 0
    assert "cannot start: stopped while preparing the store" in log.read_text()


def test_a_service_whose_store_does_not_answer_says_so(infra, mongo_db_name, tmp_path):
    env = process_env(infra, mongo_db_name, MONGODB_URL="mongodb://svc:hunter22@127.0.0.1:9/?directConnection=true", MONGODB_TIMEOUT_MS="500")
    run = subprocess.run([sys.executable, "-m", "services.timeout_sweeper"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    said = run.stdout + run.stderr
    assert "cannot start: the store did not answer within 0.5 s (127.0.0.1:9; MONGODB_URL, MONGODB_TIMEOUT_MS)" in said
    assert "hunter22" not in said
