"""The service skeleton all five services share: one factory wires broker, store, telemetry,
HTTP and lifecycle from settings; nothing connects until the service starts."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import uvicorn
from faststream import FastStream
from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from shared.contracts.registry import Topic
from shared.runtime.dead_letter import DeadLetters
from shared.runtime.decoding import documented_payloads
from shared.runtime.gc_tuning import GcPauses, tune
from shared.runtime.http import ReadinessCheck, health_routes
from shared.runtime.kafka import MissingTopics, broker_topics, build_broker, build_producer, topics_in_cluster, wait_for_topics
from shared.runtime.outbox import Outbox, Publisher
from shared.runtime.logging import configure_logging, get_logger
from shared.runtime.store import build_mongo_client, database, ping
from shared.runtime.telemetry import build_tracer_provider
from shared.runtime.tracing import RecordTracer
from shared.settings import ServiceSettings

Hook = Callable[[], Awaitable[None]]
log = get_logger("hometeam.service")

VERSION = "0.1.0"


@dataclass
class Runtime:
    """The clients one service process uses, built once by ``build_runtime``."""

    settings: ServiceSettings
    registry: CollectorRegistry
    tracer_provider: trace.TracerProvider
    broker: KafkaBroker
    publisher: Publisher
    mongo: AsyncMongoClient
    db: AsyncDatabase
    dead_letters: DeadLetters
    tracing: RecordTracer
    on_startup: list[Hook] = field(default_factory=list)
    on_shutdown: list[Hook] = field(default_factory=list)
    stop_requested: bool = False  # a signal came (uvicorn acts on it only once start-up is over)
    readiness: dict[str, ReadinessCheck] = field(default_factory=dict)
    background: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def topic(self, name: str) -> str:
        return self.settings.topic(name)

    def outbox(self, source: str) -> Outbox:
        return Outbox(self.publisher, source, self.settings.kafka_topic_prefix)

    def document_publications(self, *topics: Topic) -> None:
        """Declare the topics this service writes, so its AsyncAPI document shows them (the
        records themselves go out through the outbox)."""
        for topic in topics:
            self.broker.publisher(
                self.topic(topic.name),
                title=f"{topic.name}:publish",
                description=topic.description,
                schema=documented_payloads(topic),
            )


def build_runtime(
    settings: ServiceSettings,
    *,
    span_processors: Sequence[SpanProcessor] = (),
    mongo: AsyncMongoClient | None = None,
    description: str = "",
) -> Runtime:
    if not settings.service_instance:
        settings = settings.model_copy(
            update={"service_instance": f"{socket.gethostname()}:{os.getpid()}"}
        )
    registry = CollectorRegistry(auto_describe=True)
    tracer_provider = build_tracer_provider(settings, span_processors)
    broker = build_broker(
        settings, metrics_registry=registry, tracer_provider=tracer_provider, description=description
    )
    client = mongo or build_mongo_client(settings, registry)
    db = database(client, settings)
    tracer = tracer_provider.get_tracer("hometeam")
    publisher = Publisher(lambda: build_producer(settings), tracer, registry)
    runtime = Runtime(
        settings=settings,
        registry=registry,
        tracer_provider=tracer_provider,
        broker=broker,
        publisher=publisher,
        mongo=client,
        db=db,
        dead_letters=DeadLetters(publisher, settings.service_name, registry),
        tracing=RecordTracer(tracer, settings.service_name),
    )
    runtime.readiness["kafka"] = _kafka_check(broker)
    runtime.readiness["store"] = lambda: ping(db)
    return runtime


def _kafka_check(broker: KafkaBroker) -> ReadinessCheck:
    async def check() -> None:
        if not await broker.ping(timeout=2.0):
            raise ConnectionError("kafka did not answer")

    return check


@dataclass
class Service:
    """A runnable service: the ASGI app uvicorn serves, and the FastStream app (AsyncAPI)."""

    runtime: Runtime
    http: Starlette
    app: FastStream
    extras: dict[str, Any] = field(default_factory=dict)  # service parts tests reach into

    @property
    def broker(self) -> KafkaBroker:
        return self.runtime.broker


def assemble(runtime: Runtime, *, title: str, description: str, routes: Sequence[BaseRoute] = ()) -> Service:
    """Build the FastStream and HTTP apps around a runtime whose subscribers are registered."""

    gc_pauses = GcPauses(runtime.registry)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        gc_pauses.start()
        for hook in runtime.on_startup:
            await hook()
        await runtime.publisher.start()
        try:
            await wait_for_topics(
                lambda: topics_in_cluster(runtime.publisher.producer),
                broker_topics(runtime.broker, runtime.settings.kafka_topic_prefix),
                runtime.settings.startup_topics_wait_s,
                lambda: runtime.stop_requested,
            )
        except BaseException as exc:
            if isinstance(exc, MissingTopics):
                log.error("cannot start: %s", exc)
            await runtime.publisher.stop()
            await runtime.mongo.close()
            raise
        await runtime.broker.start()
        tasks = [asyncio.create_task(job()) for job in runtime.background]
        log.info("service started", extra={"service_name": runtime.settings.service_name})
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # broker.stop() waits for in-flight handlers (graceful_timeout), so their offsets
            # are committed only after their effects are durable.
            await runtime.broker.stop()
            await runtime.publisher.stop()
            for hook in runtime.on_shutdown:
                await hook()
            await runtime.mongo.close()
            shutdown = getattr(runtime.tracer_provider, "shutdown", None)  # the no-op provider has none
            if shutdown is not None:
                shutdown()
            gc_pauses.stop()
            log.info("service stopped", extra={"service_name": runtime.settings.service_name})

    all_routes = [*health_routes(runtime.registry, runtime.readiness), *routes]
    http = Starlette(routes=all_routes, lifespan=lifespan)
    app = FastStream(
        runtime.broker,
        specification=AsyncAPI(title=title, version=VERSION, description=description),
    )
    return Service(runtime=runtime, http=http, app=app)


def serve(service: Service) -> None:
    """Run a service until SIGINT/SIGTERM, then shut down gracefully."""
    settings = service.runtime.settings
    configure_logging(settings.service_name, settings.log_level)
    config = uvicorn.Config(
        service.http,
        host=settings.http_host,
        port=settings.http_port,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=20,
    )
    tune(settings.gc_thresholds)  # the service is built: what exists now is never garbage
    asyncio.run(_Server(config, service.runtime).serve())


class _Server(uvicorn.Server):
    """uvicorn's server, telling the runtime when a stop is asked for: during start-up uvicorn
    only notes it, and a start-up waiting for something (topics) should give up at once."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.runtime.stop_requested = True
        super().handle_exit(sig, frame)


def run_main(factory: Callable[[], Any]) -> None:
    """Entry point body shared by ``python -m services.<name>``."""
    serve(factory())
