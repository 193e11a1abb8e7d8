"""Reading records: envelope first, then the payload model its ``type`` names for the topic.

Read tolerantly (unknown fields are ignored) but never loosely: a payload that does not fit
its model, a type the topic does not carry, or an oversized record is poison.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar, Union

from aiokafka import ConsumerRecord
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, WithJsonSchema

from shared.contracts.envelope import Envelope, ReadEnvelope, read_envelope_type
from shared.contracts.registry import Topic
from shared.runtime.dead_letter import DeadLetters, PoisonMessage, error_type
from shared.runtime.logging import get_logger

log = get_logger("hometeam.decoding")

MAX_RECORD_BYTES = 64 * 1024

PayloadT = TypeVar("PayloadT", bound=BaseModel)


@dataclass(slots=True, frozen=True)
class Incoming(Generic[PayloadT]):
    """A decoded record: where it came from, its envelope, and its typed payload."""

    record: ConsumerRecord
    envelope: ReadEnvelope
    payload: PayloadT

    @property
    def offset(self) -> int:
        return self.record.offset

    @property
    def partition(self) -> int:
        return self.record.partition


class TopicDecoder:
    """Decodes records of one topic; raises PoisonMessage or ValidationError for bad ones.

    The envelope and its payload are validated in one pass from the record's bytes, as a union
    of the topic's payloads' ``ReadEnvelope`` told apart by ``type``: a type the topic does not
    carry is ``unknown_type`` whatever else is wrong with the record. A ValidationError's
    locations start with the record's ``type`` (``describe_error`` leaves it out)."""

    def __init__(self, topic: Topic, max_bytes: int = MAX_RECORD_BYTES) -> None:
        self.topic = topic
        self.max_bytes = max_bytes
        variants = tuple(read_envelope_type(p) for p in topic.payloads)
        if len(variants) == 1:
            self._adapter: TypeAdapter[ReadEnvelope] = TypeAdapter(variants[0])
        else:
            self._adapter = TypeAdapter(Annotated[Union[variants], Field(discriminator="type")])  # type: ignore[arg-type]  # noqa: UP007

    def decode(self, record: ConsumerRecord) -> Incoming[Any]:
        value = record.value
        if value is None:
            raise PoisonMessage("empty", "record has no value")
        if len(value) > self.max_bytes:
            raise PoisonMessage("oversized", f"{len(value)} bytes > {self.max_bytes}")
        try:
            envelope = self._adapter.validate_json(value)
        except ValidationError as exc:
            tag = unknown_tag(exc)
            if tag is None:
                raise
            raise PoisonMessage("unknown_type", f"type {tag[:100]!r} is not carried by {self.topic.name}") from None
        return Incoming(record=record, envelope=envelope, payload=envelope.data)


def unknown_tag(error: ValidationError) -> str | None:
    """The ``type`` of a record whose type is not one of the decoder's, from its error."""
    for e in error.errors(include_url=False):
        if e["type"] == "union_tag_invalid" and not e["loc"]:
            return str(e.get("ctx", {}).get("tag", ""))
        if e["type"] == "literal_error" and e["loc"] == ("type",):
            return str(e["input"])
    return None


def documented_payloads(*topics: Topic) -> Any:
    """The handler parameter type of a batch subscriber: raw bytes at run time (decoded by
    ``TopicDecoder``), documented in AsyncAPI as the topics' envelope and payload models."""
    payloads = tuple(p for t in topics for p in t.payloads)
    union = Union[payloads] if len(payloads) > 1 else payloads[0]  # noqa: UP007
    schema = Envelope[union].model_json_schema()  # type: ignore[valid-type]
    return Annotated[list[bytes], WithJsonSchema(_inline_refs(schema))]


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace local ``$ref``s by their definitions: FastStream places a parameter's schema
    into the AsyncAPI document as is, so it must stand alone."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                target = walk(defs[ref.removeprefix("#/$defs/")])
                extra = {k: walk(v) for k, v in node.items() if k != "$ref"}
                return {**target, **extra}
            return {k: walk(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


class BatchReader:
    """Decodes a batch of records from one or more topics; poison records go to their topic's
    dead-letter topic (logged without content) and are left out of the result."""

    def __init__(self, topics: Sequence[Topic], dead_letters: DeadLetters, topic_prefix: str = "") -> None:
        self._decoders = {topic_prefix + t.name: TopicDecoder(t) for t in topics}
        self._dead_letter_topic = {
            topic_prefix + t.name: topic_prefix + t.dead_letter for t in topics if t.dead_letter
        }
        self._dead_letters = dead_letters

    async def read(self, records: Sequence[ConsumerRecord]) -> list[Incoming[Any]]:
        decoded: list[Incoming[Any]] = []
        for record in records:
            try:
                decoded.append(self._decoders[record.topic].decode(record))
            except (PoisonMessage, ValidationError) as exc:
                await self.reject(record, exc)
        return decoded

    async def reject(self, record: ConsumerRecord, error: BaseException) -> None:
        """Dead-letter one record that can never be processed."""
        log.warning(
            "dead-lettering record",
            extra={
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "error_type": error_type(error),
            },
        )
        await self._dead_letters.send(record, self._dead_letter_topic[record.topic], error)

    async def flush(self) -> None:
        await self._dead_letters.flush()
