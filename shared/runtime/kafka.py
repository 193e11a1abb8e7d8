"""The one place a service's Kafka broker is built, with the settings that keep data safe.

Producers: ``acks=all`` with idempotence and no linger (a batch's outputs are queued in one
turn of the event loop, so they go out as one request without waiting): no write is lost.
Consumers: batch subscribers, ``auto_offset_reset=earliest`` (a new group must not
skip what is already there) and ``AckPolicy.NACK_ON_ERROR`` (commit after the handler's
effects are durable; on a transient error rewind and retry). Poison records never raise:
the handler dead-letters them (see ``shared.runtime.dead_letter``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.partitioner import DefaultPartitioner, murmur2
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from shared.contracts.registry import TOPICS
from shared.runtime.telemetry import KeylessKafkaTelemetryMiddleware
from shared.settings import ServiceSettings

ACK_POLICY = AckPolicy.NACK_ON_ERROR

log = logging.getLogger("hometeam.kafka")


def kafka_security(settings: ServiceSettings) -> BaseSecurity | None:
    """SASL (PLAIN / SCRAM) and TLS from settings; None for a plaintext local broker."""
    protocol = settings.kafka_security_protocol
    context: ssl.SSLContext | None = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
        if settings.kafka_ssl_certfile:
            context.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile)
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        if not settings.kafka_sasl_username or settings.kafka_sasl_password is None:
            raise ValueError("KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD are required for SASL")
        cls = {
            "PLAIN": SASLPlaintext,
            "SCRAM-SHA-256": SASLScram256,
            "SCRAM-SHA-512": SASLScram512,
        }[settings.kafka_sasl_mechanism]
        return cls(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value(),
            ssl_context=context,
            use_ssl=context is not None,
        )
    if context is not None:
        return BaseSecurity(ssl_context=context, use_ssl=True)
    return None


def client_security_options(settings: ServiceSettings) -> dict[str, Any]:
    """The same SASL / TLS settings, as keyword arguments of aiokafka's own clients."""
    security = kafka_security(settings)
    options: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if security is not None and security.ssl_context is not None:
        options["ssl_context"] = security.ssl_context
    if settings.kafka_security_protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        options.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None,
        )
    return options


class RememberingPartitioner:
    """aiokafka's ``DefaultPartitioner`` (murmur2 of the key, as the Java client does, so a
    key lands where every other client puts it), with each key's hash remembered: murmur2
    runs in pure Python there, ~5 µs per record, and most records a service sends go to keys
    it sent to moments before (a customer's events). Forgets everything once it holds
    ``max_keys`` (a bounded memory; a forgotten key is hashed again)."""

    def __init__(self, max_keys: int = 50_000) -> None:
        self.max_keys = max_keys
        self._hashes: dict[bytes, int] = {}

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return DefaultPartitioner()(key, all_partitions, available)
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) >= self.max_keys:
                self._hashes.clear()
            hashed = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return all_partitions[hashed % len(all_partitions)]


def build_producer(settings: ServiceSettings, partitioner: RememberingPartitioner | None = None) -> AIOKafkaProducer:
    """The producer a service's outputs go through (see ``shared.runtime.outbox``): the same
    durability as the broker's (acks=all, idempotence), a batch's outputs in one request, and
    none of the per-message framework overhead (measured: ~15 µs per record against ~300 µs
    through FastStream's publish with its middlewares). ``partitioner``: one to share with
    the ``Publisher`` that picks partitions for its batches (one memory of keys)."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=f"hometeam-{settings.service_name}-outbox",
        acks="all",
        enable_idempotence=True,
        linger_ms=settings.producer_linger_ms,
        max_batch_size=256 * 1024,
        partitioner=partitioner if partitioner is not None else RememberingPartitioner(),
        **client_security_options(settings),
    )


class _TopicsAlreadyChecked(logging.Filter):
    """FastStream warns at every subscriber's start that it creates no topics
    (``allow_auto_create_topics=False``); each service waits for its topics before its broker
    starts (``wait_for_topics``, exit code 3 if they never come), so that line only alarms
    whoever reads the logs. Every other FastStream line passes."""

    MESSAGE = "Auto create topics is disabled. Make sure the topics exist."

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.MESSAGE


FASTSTREAM_LOGGER = logging.getLogger("hometeam.faststream")
if not any(isinstance(f, _TopicsAlreadyChecked) for f in FASTSTREAM_LOGGER.filters):
    FASTSTREAM_LOGGER.addFilter(_TopicsAlreadyChecked())


def build_broker(
    settings: ServiceSettings,
    *,
    metrics_registry: CollectorRegistry,
    tracer_provider: trace.TracerProvider,
    description: str = "",
) -> KafkaBroker:
    return KafkaBroker(
        settings.kafka_bootstrap_servers,
        client_id=f"hometeam-{settings.service_name}",
        acks="all",
        enable_idempotence=True,
        linger_ms=settings.producer_linger_ms,
        max_batch_size=256 * 1024,
        allow_auto_create_topics=False,
        security=kafka_security(settings),
        middlewares=(
            KafkaPrometheusMiddleware(registry=metrics_registry, app_name=settings.service_name),
            # With nothing to receive spans (no OTLP endpoint, ``build_tracer_provider``), no
            # telemetry middleware: it still read every record's headers for baggage and made
            # no-op spans, 2-6% of each service's CPU (a profile at 2,000 msg/s).
            *(() if isinstance(tracer_provider, trace.NoOpTracerProvider) else (KeylessKafkaTelemetryMiddleware(tracer_provider=tracer_provider),)),
        ),
        graceful_timeout=15.0,
        description=description,
        # FastStream's own messages go through the service's JSON logging (no extra handler),
        # and its per-batch "Received"/"Processed" lines only at DEBUG.
        logger=FASTSTREAM_LOGGER,
        log_level=logging.DEBUG,
    )


async def raw_body(msg: Any) -> bytes:
    """Decoder that leaves bytes alone: handlers decode envelopes themselves, so a malformed
    record becomes a dead letter instead of an exception inside the framework."""
    return msg.body


def batch_subscriber_options(settings: ServiceSettings, *, group_suffix: str = "") -> dict[str, Any]:
    """Keyword arguments for ``broker.subscriber`` shared by every consumer of every service."""
    return {
        "batch": True,
        "group_id": settings.group_id + group_suffix,
        "ack_policy": ACK_POLICY,
        "auto_offset_reset": "earliest",
        "max_records": settings.consumer_batch_max_records,
        "batch_timeout_ms": settings.consumer_batch_timeout_ms,
        "fetch_min_bytes": settings.consumer_fetch_min_bytes,
        "fetch_max_wait_ms": settings.consumer_fetch_max_wait_ms,
        "max_partition_fetch_bytes": settings.consumer_max_partition_fetch_bytes,
        "decoder": raw_body,
        "max_poll_interval_ms": 5 * 60 * 1000,
        # Range assignment gives one consumer the same partition numbers of every topic it
        # reads; customer-keyed topics share a partition count, so a customer's records from
        # all of them reach the same consumer (a single writer per customer).
        "partition_assignment_strategy": (RangePartitionAssignor,),
    }


def fetch_wait_for(records_per_s: float, light_wait_ms: int, heavy_wait_ms: int, light_below_per_s: float) -> int:
    """The fetch wait for a consumer whose input ran at ``records_per_s`` lately: a light
    stream (records arriving, fewer than ``light_below_per_s``) never fills a fetch's minimum
    bytes, so each record would wait the whole ``heavy_wait_ms`` at this hop; an idle consumer
    keeps the long wait (its polls stay cheap) and so does a busy one (its batches stay large:
    what a batch costs apart from its records is paid fewer times)."""
    return light_wait_ms if 0 < records_per_s < light_below_per_s else heavy_wait_ms


class FetchWaitTuner:
    """Adapts a consumer's fetch wait to its input (``fetch_wait_for``) over the last
    ``window_s`` seconds, rechecked every second by ``run`` (a background task). The wait is
    aiokafka's (0.14) ``Fetcher._fetch_max_wait_ms``, read for every fetch request it builds;
    a consumer without one is left alone."""

    def __init__(self, light_wait_ms: int, heavy_wait_ms: int, light_below_per_s: float, window_s: int = 5) -> None:
        self.light_wait_ms = light_wait_ms
        self.heavy_wait_ms = heavy_wait_ms
        self.light_below_per_s = light_below_per_s
        self.seconds: collections.deque[int] = collections.deque([0] * window_s, maxlen=window_s)
        self.current = heavy_wait_ms

    def note(self, records: int) -> None:
        """Records a batch brought (call per batch)."""
        self.seconds[-1] += records

    def tick(self, consumer: AIOKafkaConsumer | None) -> int:
        """Set the wait for the rate of the last window, and start the next second."""
        rate = sum(self.seconds) / len(self.seconds)
        self.current = fetch_wait_for(rate, self.light_wait_ms, self.heavy_wait_ms, self.light_below_per_s)
        fetcher = getattr(consumer, "_fetcher", None)
        if fetcher is not None and hasattr(fetcher, "_fetch_max_wait_ms"):
            fetcher._fetch_max_wait_ms = self.current
        self.seconds.append(0)
        return self.current

    async def run(self, consumer: Callable[[], AIOKafkaConsumer | None]) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.tick(consumer())


def fetch_wait_tuner(
    settings: ServiceSettings,
    background: list[Callable[[], Awaitable[None]]] | None = None,
    consumer: Callable[[], AIOKafkaConsumer | None] = lambda: None,
) -> FetchWaitTuner | None:
    """The service's tuner for a consumer on the way to a routing decision (None when the
    light wait is not shorter than the service's wait), its ``run`` over ``consumer`` added
    to the service's ``background`` jobs."""
    if settings.consumer_fetch_light_wait_ms >= settings.consumer_fetch_max_wait_ms:
        return None
    tuner = FetchWaitTuner(
        settings.consumer_fetch_light_wait_ms, settings.consumer_fetch_max_wait_ms, settings.consumer_fetch_light_below_per_s
    )
    if background is not None:
        background.append(lambda: tuner.run(consumer))
    return tuner


def current_records(broker: KafkaBroker) -> Sequence[ConsumerRecord]:
    """The ConsumerRecords of the batch the calling subscriber's handler was given, from the
    broker's context. Not a ``message: KafkaMessage`` parameter: FastStream 0.7 (fast_depends
    3) resolves a context parameter by calling its sync ``Context.use`` in a worker thread
    (``anyio.to_thread``) for every call, 0.2 ms more per batch (``tests/unit/test_current_records.py``)
    and 2-5% of a service's CPU in thread hand-offs."""
    message = broker.context.get_local("message")
    if message is None:
        raise RuntimeError("no message in the broker's context: call current_records from a subscriber's handler")
    return records_of(message)


def records_of(message: Any) -> Sequence[ConsumerRecord]:
    """The ConsumerRecords behind a FastStream batch message (a tuple, or a list in tests)."""
    raw = message.raw_message
    return raw if isinstance(raw, (tuple, list)) else (raw,)


class MissingTopics(RuntimeError):
    """A service's input topics do not exist (services never create topics: auto-creation is
    off, see ``scripts/stack_probe.py create-topics``)."""


async def wait_for_topics(
    existing: Callable[[], Awaitable[Collection[str]]],
    wanted: Iterable[str],
    timeout_s: float,
    stop_requested: Callable[[], bool] = lambda: False,
    interval_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Return once every ``wanted`` topic is among the ``existing`` ones (asked every
    ``interval_s``). A consumer started on a missing topic waits in aiokafka's start about 40 s
    per topic, logging an error ten times a second, and the service ignores SIGTERM until its
    start-up ends (a send to a missing topic waits as long, and then fails the batch); this
    waits at most ``timeout_s`` with one warning and raises ``MissingTopics`` naming what is
    missing, then or as soon as a stop is requested."""
    wanted = sorted(set(wanted))
    deadline = clock() + timeout_s
    warned = False
    while True:
        have = set(await existing())
        missing = [t for t in wanted if t not in have]
        if not missing:
            return
        listed = ", ".join(missing)
        if stop_requested():
            raise MissingTopics(f"stopped while waiting for topics to exist: {listed}")
        if clock() >= deadline:
            raise MissingTopics(
                f"topics missing after {timeout_s:g} s: {listed} (create them: scripts/stack_probe.py "
                "create-topics, see the README's \"Using an existing Kafka and MongoDB\")"
            )
        if not warned:
            log.warning("waiting up to %g s for topics to exist: %s", timeout_s, listed)
            warned = True
        await asyncio.sleep(interval_s)


async def topics_in_cluster(producer: AIOKafkaProducer) -> set[str]:
    """The topics the cluster has now (one metadata request on the producer's connection)."""
    return set((await producer.client.fetch_all_metadata()).topics())


def broker_topics(broker: KafkaBroker, prefix: str = "") -> list[str]:
    """Every topic the broker's subscribers read, their dead-letter topics (a poison record
    sent to a missing one would stall its consumer) and the topics its (documented)
    publishers write. ``prefix``: the one every topic name carries."""
    read = [name for subscriber in broker.subscribers for name in subscriber.topic_names_for_subscribe]
    registered = {prefix + t.name: t for t in TOPICS}
    dead_letters = [prefix + t.dead_letter for name in read if (t := registered.get(name)) is not None and t.dead_letter]
    return read + dead_letters + [publisher.topic for publisher in broker.publishers]
