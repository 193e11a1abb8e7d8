"""Settings every service reads from its environment (pydantic-settings, the only way in).

Variable names are the plain upper-case field names, e.g. ``KAFKA_BOOTSTRAP_SERVERS``,
``MONGODB_URL``, ``HTTP_PORT``. Defaults point at the local stack started by
``scripts/stack.sh`` (see README).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

LOCAL_KAFKA = "127.0.0.1:19092"
LOCAL_MONGODB = "mongodb://127.0.0.1:27027/?directConnection=true&retryWrites=false"


class ServiceSettings(BaseSettings):
    """What every hometeam service needs: Kafka, the store, HTTP, logs and traces."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True)

    service_name: str = "hometeam"
    service_instance: str = Field(default="", description="Replica name; defaults to host:pid")

    # Kafka
    kafka_bootstrap_servers: str = LOCAL_KAFKA
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    kafka_group_prefix: str = Field(
        default="hometeam", description="Consumer groups are '<prefix>.<service>'"
    )
    kafka_topic_prefix: str = Field(
        default="", description="Prepended to every topic name (isolates test runs)"
    )
    # Up to 2,000 records per batch: with 500, conversation-state (five input topics) fell
    # behind at 1,750 msg/s while the machine still had CPU to spare: a batch's store and
    # Kafka round trips take about as long for 2,000 records as for 500 (make bench,
    # docs/benchmarks.md 2026-12-04 evening). Batches are that large only under load.
    consumer_batch_max_records: int = Field(
        default=2_000, ge=1, le=10_000, description="Most records one batch handles (per consumer)"
    )
    consumer_batch_timeout_ms: int = Field(default=20, ge=1, le=5_000)
    # A fetch is answered once 64 KB are there (~100 messages) or after 40 ms: under load every
    # consumer then handles fewer, larger batches (measured in make bench at 375-1,000 msg/s:
    # 10-35% less CPU per message; at 750-1,000 msg/s p99 to the routing decision about halved),
    # for up to 40 ms more per hop when traffic is light (p50 ~50 -> ~125 ms at 5 msg/s, measured
    # then; the consumers on the way to a decision now shorten the wait while their input is
    # light: ``consumer_fetch_light_wait_ms``).
    consumer_fetch_min_bytes: int = Field(
        default=65_536, ge=1, le=1_048_576, description="The broker answers a fetch once this much is there (or after the max wait)"
    )
    consumer_fetch_max_wait_ms: int = Field(default=40, ge=0, le=5_000, description="Longest the broker holds a fetch for the min bytes")
    # aiokafka prefetches a fetch's worth of every assigned partition and holds it until the
    # handler takes it; behind a backlog that was 1 MB per partition (aiokafka's default), 30 MB
    # of records in conversation-state (five topics of six partitions). A fetch of a live topic
    # brings a few KB per partition; a record larger than this still comes, alone.
    consumer_max_partition_fetch_bytes: int = Field(
        default=262_144,
        ge=1_024,
        le=16 * 1_048_576,
        description="Most a fetch brings of one partition: what waits prefetched in memory, per partition, behind a backlog",
    )
    # ingest and conversation-state, on the way to every routing decision: while their input
    # is light (records arriving, fewer than ``consumer_fetch_light_below_per_s`` a second over
    # the last 5 s) a fetch never fills its 64 KB, so it waits ``consumer_fetch_light_wait_ms``
    # instead of the whole ``consumer_fetch_max_wait_ms`` (shared/runtime/kafka.py FetchWaitTuner).
    consumer_fetch_light_wait_ms: int = Field(
        default=10, ge=0, le=5_000, description="The fetch wait while the input is light (not shorter than the max wait: off)"
    )
    consumer_fetch_light_below_per_s: float = Field(
        default=100.0, ge=0, description="Records a second under which a consumer's input counts as light"
    )
    # No linger: a batch's outputs are queued without the event loop turning (the outbox sends
    # them all, then waits for the acks), so the producer takes them as one request at the next
    # turn anyway; a linger only held each batch's outputs back (measured with 5 ms: ~30 ms
    # more p50 to the routing decision at 20 msg/s, the same CPU per message at 1,000).
    producer_linger_ms: int = Field(default=0, ge=0, le=1_000, description="How long the producer holds a record for more to join its request")
    startup_topics_wait_s: float = Field(
        default=60.0, ge=0, description="How long a starting service waits for its input topics to exist before it exits naming them"
    )

    # Store
    mongodb_url: SecretStr = SecretStr(LOCAL_MONGODB)
    mongodb_database: str = "hometeam"
    mongodb_timeout_ms: int = Field(default=5_000, ge=100)

    # HTTP (health, readiness, metrics and each service's API)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65_535)

    # Logs and traces
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None, description="OTLP/HTTP endpoint, e.g. http://otel-collector:4318"
    )
    otel_traces_sampler_ratio: float = Field(default=1.0, ge=0.0, le=1.0)

    # Python's garbage collector (shared/runtime/gc_tuning.py)
    gc_thresholds: tuple[int, int, int] = Field(
        default=(50_000, 20, 20),
        description=(
            "Collection thresholds of the service process (gc.set_threshold), as a JSON list, e.g. [700, 10, 10] for "
            "CPython's own; what exists once the service is built is frozen either way"
        ),
    )

    def topic(self, name: str) -> str:
        return f"{self.kafka_topic_prefix}{name}"

    @property
    def group_id(self) -> str:
        return f"{self.kafka_group_prefix}.{self.service_name}"
