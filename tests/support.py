"""Helpers for tests on the real broker and store: run services in-process, publish
envelopes, and wait for records or documents by polling with a deadline."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from pydantic import BaseModel
from pymongo import monitoring

from shared.contracts.envelope import new_envelope
from shared.runtime.service import Service
from shared.runtime.topics import delete_topics_with_prefix, ensure_topics

T = TypeVar("T")
S = TypeVar("S")


def service_settings(cls: type[S], infra: Any, prefix: str, db: str, **extra: Any) -> S:
    return cls(  # type: ignore[call-arg]
        kafka_bootstrap_servers=infra.kafka,
        mongodb_url=infra.mongodb_url,
        mongodb_database=db,
        kafka_topic_prefix=prefix,
        kafka_group_prefix=f"test-{prefix}",
        consumer_batch_timeout_ms=10,
        **extra,
    )


@asynccontextmanager
async def running(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    """Start a service's lifespan (broker, consumers, hooks) and give an HTTP client for it."""
    async with service.http.router.lifespan_context(service.http):
        transport = httpx.ASGITransport(app=service.http)
        async with httpx.AsyncClient(transport=transport, base_url="http://hometeam.test") as client:
            yield client


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout_s: float = 60.0, what: str = "condition") -> T:
    """Poll ``probe`` until it returns something truthy, or fail after the deadline."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.5)


class KafkaProbe:
    """A producer and a from-the-beginning reader of a test's prefixed topics."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
        self._consumers: dict[str, AIOKafkaConsumer] = {}
        self.seen: dict[str, list[ConsumerRecord]] = {}

    async def __aenter__(self) -> KafkaProbe:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()
        for consumer in self._consumers.values():
            await consumer.stop()

    async def send_raw(self, topic: str, value: bytes, key: bytes | None = None, headers: list[tuple[str, bytes]] | None = None) -> None:
        await self.producer.send_and_wait(self.prefix + topic, value, key=key, headers=headers)

    async def send(self, topic: str, key: str, payload: BaseModel, *, time: datetime | None = None, id: str | None = None) -> str:
        envelope = new_envelope(
            payload, subject=key, source="/tests", time=time or datetime.now(UTC), id=id or str(uuid.uuid4())
        )
        await self.send_raw(topic, envelope.model_dump_json().encode(), key.encode())
        return envelope.id

    async def records(self, topic: str) -> list[ConsumerRecord]:
        """Everything on the topic so far (reads incrementally; no consumer group)."""
        name = self.prefix + topic
        consumer = self._consumers.get(name)
        if consumer is None:
            consumer = AIOKafkaConsumer(name, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
            await consumer.start()
            self._consumers[name] = consumer
            self.seen[name] = []
        # Drain what is there now: read until the consumer has caught up with the end offsets.
        for _ in range(1000):
            batches = await consumer.getmany(timeout_ms=100, max_records=5000)
            for batch in batches.values():
                self.seen[name].extend(batch)
            assignment = consumer.assignment()
            ends = await consumer.end_offsets(list(assignment))
            positions = {tp: await consumer.position(tp) for tp in ends}
            if all(positions[tp] >= end for tp, end in ends.items()):
                break
        return self.seen[name]

    async def envelopes(self, topic: str) -> list[dict[str, Any]]:
        return [json.loads(r.value) for r in await self.records(topic)]

    async def wait_for(
        self, topic: str, predicate: Callable[[dict[str, Any]], bool], *, count: int = 1, timeout_s: float = 60.0
    ) -> list[dict[str, Any]]:
        async def probe() -> list[dict[str, Any]] | None:
            found = [e for e in await self.envelopes(topic) if predicate(e)]
            return found if len(found) >= count else None

        return await eventually(probe, timeout_s, f"{count} matching record(s) on {topic}")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: all held open while they are chosen (ports chosen one after
    another can repeat, and two services given one port half-start)."""
    import socket
    from contextlib import ExitStack

    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


@asynccontextmanager
async def serving(service: Service) -> AsyncIterator[int]:
    """Serve a service's HTTP app on a real 127.0.0.1 port (for scrapers such as Prometheus)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(service.http, host="127.0.0.1", port=port, lifespan="on", log_config=None, access_log=False))
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: asyncio.sleep(0, result=server.started), timeout_s=60, what="HTTP server started")
        yield port
    finally:
        server.should_exit = True
        await task


class StoreWrites(monitoring.CommandListener):
    """Every document a PyMongo client inserts, updates or deletes, as (command, collection, _id)."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, str, Any]] = []
        self.finds: list[str] = []  # the collection of each find command (reads, kept apart)
        self.find_filters: list[tuple[str, dict[str, Any]]] = []  # (collection, filter) of each
        self.write_filters: list[tuple[str, dict[str, Any]]] = []  # (collection, filter) of each update and delete

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name = event.command_name
        if name == "find":
            self.finds.append(event.command["find"])
            self.find_filters.append((event.command["find"], dict(event.command.get("filter", {}))))
        elif name in ("update", "delete"):
            key = "updates" if name == "update" else "deletes"
            self.ops.extend((name, event.command[name], u["q"]["_id"]) for u in event.command[key])
            self.write_filters.extend((event.command[name], dict(u["q"])) for u in event.command[key])
        elif name == "insert":
            self.ops.extend((name, event.command[name], d["_id"]) for d in event.command["documents"])

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def queries(self, collection: str) -> list[dict[str, Any]]:
        """The filters of the finds of ``collection`` that name more than ``_id`` (those the
        embedded FerretDB answers by scanning the collection)."""
        return [f for c, f in self.find_filters if c == collection and set(f) != {"_id"}]

    def scanning_writes(self, collection: str) -> list[dict[str, Any]]:
        """The filters of the updates and deletes of ``collection`` that name more than
        ``_id`` (FerretDB scans the collection for each)."""
        return [f for c, f in self.write_filters if c == collection and set(f) != {"_id"}]

    def of(self, collection: str) -> list[tuple[str, Any]]:
        """(command, _id) of every write to ``collection``."""
        return [(cmd, i) for cmd, c, i in self.ops if c == collection]

    def replaced(self, collection: str) -> list[Any]:
        """The _ids ``collection`` got updates (replaces) for."""
        return [i for cmd, i in self.of(collection) if cmd == "update"]

    def inserted(self, collection: str) -> list[Any]:
        """The _ids inserted into ``collection`` (attempts: a duplicate key counts too)."""
        return [i for cmd, i in self.of(collection) if cmd == "insert"]


@dataclass
class IsolatedRun:
    """Topics, a database and a team directory of one test run's own."""

    prefix: str
    db_name: str
    config: Path
    probe: KafkaProbe


async def isolated_run(stack: AsyncExitStack, infra: Any, tag: str, kind: str, teams: dict[str, Any], config_dir: Path) -> IsolatedRun:
    """Create a run's topics (``<tag><run>.``; deleted when ``stack`` closes: a run leaves no
    partitions behind), write its team directory into ``config_dir`` and open a probe on its
    topics; its database is ``hometeam_<kind>_<run>``."""
    run = uuid.uuid4().hex[:10]
    prefix = f"{tag}{run}."
    await ensure_topics(infra.kafka, prefix=prefix)
    stack.push_async_callback(delete_topics_with_prefix, infra.kafka, prefix)
    config = config_dir / "teams.yaml"
    config.write_text(yaml.safe_dump(teams))
    probe = await stack.enter_async_context(KafkaProbe(infra.kafka, prefix))
    return IsolatedRun(prefix, f"hometeam_{kind}_{run}", config, probe)


class ManualClock:
    """A clock the test moves (``now``), for code that takes a ``clock`` callable."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
