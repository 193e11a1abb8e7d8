"""Dead letters: a record that can never be processed goes to its topic's dead-letter topic
with its original bytes, key and headers, plus headers saying where it came from and why.

Only poison (a record that will fail the same way every time) is dead-lettered; transient
failures raise, so the batch is rewound and retried.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiokafka import ConsumerRecord
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from shared.contracts.envelope import TYPE_PREFIX
from shared.runtime.outbox import Publisher

HEADER_PREFIX = "x-hometeam-dlq-"
ORIGIN_TOPIC = HEADER_PREFIX + "origin-topic"
ORIGIN_PARTITION = HEADER_PREFIX + "origin-partition"
ORIGIN_OFFSET = HEADER_PREFIX + "origin-offset"
ERROR_TYPE = HEADER_PREFIX + "error-type"
ERROR_DETAIL = HEADER_PREFIX + "error"
FAILED_BY = HEADER_PREFIX + "service"
# The tracing middleware writes the consumer's own trace context on publish; the record's
# original one is kept here.
ORIGIN_TRACEPARENT = HEADER_PREFIX + "origin-traceparent"


class PoisonMessage(Exception):
    """A record that can never be processed. ``reason`` is a short code safe for metric labels;
    ``detail`` must not contain personal data (it is written to a header and logged)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _in_envelope(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """A location as a path in the envelope (``data.agent_id``): a decoder's error starts with
    the record's ``type`` (the variant of the topic's union it was read as)."""
    if loc and isinstance(loc[0], str) and loc[0].startswith(TYPE_PREFIX):
        return loc[1:]
    return loc


def describe_error(error: BaseException) -> str:
    """A description of why a record failed that carries no input values (no message text)."""
    if isinstance(error, PoisonMessage):
        return error.detail[:1000]
    if isinstance(error, ValidationError):
        problems = [
            {"loc": ".".join(str(p) for p in _in_envelope(e["loc"])), "type": e["type"], "msg": e["msg"]}
            for e in error.errors(include_input=False, include_url=False, include_context=False)
        ]
        return json.dumps(problems)[:1000]
    return type(error).__name__


def error_type(error: BaseException) -> str:
    if isinstance(error, PoisonMessage):
        return error.reason
    if isinstance(error, ValidationError):
        return "invalid_payload"
    return type(error).__name__


class DeadLetters:
    """Publishes dead letters for one service; ``flush`` waits until Kafka has them all, and a
    handler calls it before returning so offsets are only committed once they are durable."""

    def __init__(self, publisher: Publisher, service: str, registry: CollectorRegistry) -> None:
        self._publisher = publisher
        self._service = service
        self._pending: list[asyncio.Future[Any]] = []
        self.counter = Counter(
            "hometeam_dead_letters_total",
            "Records sent to a dead-letter topic, by origin topic and reason.",
            ["topic", "reason"],
            registry=registry,
        )

    async def send(self, record: ConsumerRecord, dead_letter_topic: str, error: BaseException) -> None:
        headers = {k: v.decode("latin-1") for k, v in (record.headers or ())}
        if "traceparent" in headers:
            headers[ORIGIN_TRACEPARENT] = headers["traceparent"]
        headers.update(
            {
                ORIGIN_TOPIC: record.topic,
                ORIGIN_PARTITION: str(record.partition),
                ORIGIN_OFFSET: str(record.offset),
                ERROR_TYPE: error_type(error),
                ERROR_DETAIL: describe_error(error),
                FAILED_BY: self._service,
            }
        )
        future = await self._publisher.send(
            dead_letter_topic,
            record.value if record.value is not None else b"",
            record.key,
            [(k, v.encode("latin-1")) for k, v in headers.items()],
        )
        self._pending.append(future)
        self.counter.labels(record.topic, error_type(error)).inc()

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)
