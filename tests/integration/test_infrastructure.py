"""The foundation on the real servers: a consumer group commits offsets after handling, the
store answers through AsyncMongoClient, and every service's /readyz checks both for real."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid

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
from shared.runtime.kafka import batch_subscriber_options, build_broker, records_of
from shared.settings import ServiceSettings
from tests.support import eventually, running, service_settings

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
