"""The service skeleton all five services share: one factory wires broker, store, telemetry,
HTTP and lifecycle from settings; nothing connects until the service starts."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
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
from aiokafka.errors import KafkaConnectionError
from pydantic import ValidationError
from pydantic_settings import SettingsError
from pymongo import AsyncMongoClient
from pymongo.errors import ConnectionFailure
from pymongo.asynchronous.database import AsyncDatabase
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from shared.contracts.registry import Topic
from shared.runtime.dead_letter import DeadLetters
from shared.runtime.decoding import documented_payloads
from shared.runtime.gc_tuning import GcPauses, tune
from shared.runtime.http import ReadinessCheck, health_routes
from shared.runtime.kafka import (
    MissingTopics,
    RememberingPartitioner,
    broker_topics,
    build_broker,
    build_producer,
    topics_in_cluster,
    wait_for_topics,
)
from shared.runtime.outbox import Outbox, Publisher
from shared.runtime.logging import configure_logging, get_logger
from shared.runtime.store import build_mongo_client, database, ping
from shared.runtime.telemetry import build_tracer_provider
from shared.runtime.tracing import RecordTracer
from shared.settings import ServiceSettings
from shared.teams import TeamConfigError

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
    partitioner = RememberingPartitioner()
    publisher = Publisher(lambda: build_producer(settings, partitioner), tracer, registry, partitioner)
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
        try:
            for hook in runtime.on_startup:  # the store's indexes: a store down waits MONGODB_TIMEOUT_MS
                await until_stop_requested(hook(), lambda: runtime.stop_requested, "preparing the store")
            await until_stop_requested(runtime.publisher.start(), lambda: runtime.stop_requested, "connecting to Kafka")
            await wait_for_topics(
                lambda: topics_in_cluster(runtime.publisher.producer),
                broker_topics(runtime.broker, runtime.settings.kafka_topic_prefix),
                runtime.settings.startup_topics_wait_s,
                lambda: runtime.stop_requested,
            )
        except BaseException as exc:
            log.error("cannot start: %s", startup_failure(exc, runtime.settings))
            await runtime.publisher.stop()
            await runtime.mongo.close()
            gc_pauses.stop()
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


class StartupStopped(Exception):
    """A stop was requested while the service was still starting."""


async def until_stop_requested(step: Awaitable[Any], stop_requested: Callable[[], bool], doing: str, poll_s: float = 0.1) -> Any:
    """Await one start-up ``step``, giving up (cancelled, ``StartupStopped``) as soon as a stop
    is requested: uvicorn acts on SIGTERM only once start-up is over, and a step waiting for a
    server that does not answer (the store: ``MONGODB_TIMEOUT_MS``) would keep it waiting."""
    task = asyncio.ensure_future(step)
    try:
        while not task.done():
            if stop_requested():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise StartupStopped(f"stopped while {doing}")
            await asyncio.wait({task}, timeout=poll_s)
        return task.result()
    finally:
        if not task.done():  # this coroutine itself was cancelled
            task.cancel()


def _servers(url: str) -> str:
    """The hosts of a MongoDB URL, without its credentials or options (read from the text: a
    ``mongodb+srv://`` URL is not resolved while a failure is being reported)."""
    rest = url.split("://", 1)[1] if "://" in url else ""
    hosts = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    return hosts.replace(",", ", ") if hosts else "MONGODB_URL (not a valid MongoDB URL)"


def startup_failure(exc: BaseException, settings: ServiceSettings) -> str:
    """One line for the log saying why a start-up failed (never the store's credentials)."""
    if isinstance(exc, (MissingTopics, StartupStopped)):
        return str(exc)
    if isinstance(exc, ConnectionFailure):
        return (
            f"the store did not answer within {settings.mongodb_timeout_ms / 1000:g} s "
            f"({_servers(settings.mongodb_url.get_secret_value())}; MONGODB_URL, MONGODB_TIMEOUT_MS): {type(exc).__name__}"
        )
    if isinstance(exc, KafkaConnectionError):
        return f"Kafka did not answer at {settings.kafka_bootstrap_servers} (KAFKA_BOOTSTRAP_SERVERS): {exc}"
    if isinstance(exc, asyncio.CancelledError):
        return "start-up cancelled"
    return f"{type(exc).__name__}: {exc}"


def configuration_problem(exc: Exception) -> str | None:
    """What is wrong with a service's configuration, for a one-line error (None: not a
    configuration error). Settings come from environment variables: each is named as such,
    without the value it had (it may be a secret)."""
    if isinstance(exc, TeamConfigError):
        return f"{exc} (TEAMS_CONFIG)"
    if isinstance(exc, ValidationError) and exc.title.endswith("Settings"):
        problems = [_setting_problem(error["loc"], error["msg"]) for error in exc.errors(include_input=False, include_url=False)]
        return "invalid settings: " + "; ".join(problems)
    if isinstance(exc, SettingsError):  # a value that must be JSON (a list, a mapping) is not
        field = re.search(r'field "(\w+)"', str(exc))
        return f"invalid settings: {field.group(1).upper() if field else 'a setting'}: not a valid JSON value"
    return None


def _setting_problem(loc: tuple[int | str, ...], msg: str) -> str:
    if not loc:
        return msg
    variable = str(loc[0]).upper()  # settings are read from variables of the field's name
    inside = f" (at {'.'.join(str(part) for part in loc[1:])})" if len(loc) > 1 else ""
    return f"{variable}{inside}: {msg}"


EXIT_CONFIGURATION = 2


def run_main(factory: Callable[[], Any]) -> None:
    """Entry point body shared by ``python -m services.<name>``. A configuration error (an
    environment variable, the team directory) ends the process with one line saying what is
    wrong and exit status 2, not a traceback."""
    try:
        service = factory()
    except Exception as exc:
        problem = configuration_problem(exc)
        if problem is None:
            raise
        # (the settings did not load: the service's name as its settings give it, from its package)
        module = factory.__module__.split(".")
        configure_logging(module[1].replace("_", "-") if module[0] == "services" and len(module) > 1 else "hometeam")
        log.error("cannot start: %s", problem)
        sys.exit(EXIT_CONFIGURATION)
    serve(service)
