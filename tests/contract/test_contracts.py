"""Contract tests: the checked-in examples validate, the registry is consistent, and the
committed AsyncAPI documents match what the apps generate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.contracts.envelope import RawEnvelope, type_name
from shared.contracts.registry import MESSAGE_TYPES, TOPICS, all_topic_partitions
from shared.runtime.dead_letter import PoisonMessage, describe_error, error_type
from shared.runtime.decoding import TopicDecoder

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "shared" / "contracts" / "examples" / "v1"


def test_every_message_type_has_exactly_one_example():
    names = {p.stem for p in EXAMPLES.glob("*.json")}
    assert names == {model.__name__ for model in MESSAGE_TYPES.values()}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.stem)
def test_example_validates_as_its_type_and_topic(path: Path):
    raw = path.read_bytes()
    envelope = RawEnvelope.model_validate_json(raw)
    assert envelope.type == f"hometeam.{path.stem}"
    assert envelope.schemaversion == 1
    topics = [t for t in TOPICS if envelope.type in t.type_names]
    assert len(topics) == 1, f"{path.stem} must travel on exactly one topic"

    class Record:  # the shape TopicDecoder reads
        value = raw
        topic = topics[0].name

    decoded = TopicDecoder(topics[0]).decode(Record())  # type: ignore[arg-type]
    assert type(decoded.payload).__name__ == path.stem
    # One pass over the bytes reads what the envelope, then its payload, read apart.
    model = MESSAGE_TYPES[envelope.type]
    assert decoded.payload == model.model_validate(envelope.data)
    assert (decoded.envelope.id, decoded.envelope.time, decoded.envelope.subject, decoded.envelope.sequence) == (
        envelope.id,
        envelope.time,
        envelope.subject,
        envelope.sequence,
    )
    # Writing strictly: what we would publish reads back to the same payload.
    assert type(decoded.payload).model_validate_json(decoded.payload.model_dump_json()) == decoded.payload


def test_topic_registry_is_consistent():
    names = [t.name for t in TOPICS]
    assert len(names) == len(set(names))
    for topic in TOPICS:
        assert topic.name.endswith(".v1")
        assert topic.partitions >= 1
        assert topic.payloads
        if topic.dead_letter:
            assert topic.dead_letter == f"{topic.name}.dlq"
    externals = {t.name for t in TOPICS if t.external}
    assert {
        "channel.inbound.v1",
        "agent.actions.v1",
        "agent.presence.v1",
        "messages.outbound.v1",
        "conversations.events.v1",
    } <= externals
    assert len(all_topic_partitions()) == len(TOPICS) + sum(1 for t in TOPICS if t.dead_letter)


def test_customer_keyed_topics_are_co_partitioned():
    """Conversation-state reads several customer-keyed topics with range assignment: they must
    share one partition count so a customer's records all reach the same consumer."""
    counts = {t.name: t.partitions for t in TOPICS if t.key == "customer id"}
    assert len(set(counts.values())) == 1, counts


def test_decoder_rejects_what_does_not_fit():
    topic = next(t for t in TOPICS if t.name == "agent.actions.v1")
    decoder = TopicDecoder(topic)
    good = json.loads((EXAMPLES / "ReplyToCustomer.json").read_text())

    class Record:
        def __init__(self, value: bytes | None) -> None:
            self.value = value
            self.topic = topic.name

    # case → (the dead letter's error type, where its detail says the problem is)
    cases = {
        "not json": (b"{not json", "invalid_payload", ""),
        "wrong type": (
            json.dumps({**good, "type": type_name(MESSAGE_TYPES["hometeam.ConversationOpened"])}).encode(),
            "unknown_type",
            None,
        ),
        "wrong type, broken too": (json.dumps({**good, "type": "hometeam.Nope", "time": "x"}).encode(), "unknown_type", None),
        "no type": (json.dumps({k: v for k, v in good.items() if k != "type"}).encode(), "invalid_payload", ""),
        "object where a string belongs": (
            json.dumps({**good, "data": {**good["data"], "customer_id": {"$ne": None}}}).encode(),
            "invalid_payload",
            "data.customer_id",
        ),
        "store operator as id": (
            json.dumps({**good, "data": {**good["data"], "conversation_id": "$where"}}).encode(),
            "invalid_payload",
            "data.conversation_id",
        ),
        "missing field": (
            json.dumps({**good, "data": {k: v for k, v in good["data"].items() if k != "agent_id"}}).encode(),
            "invalid_payload",
            "data.agent_id",
        ),
        "envelope time": (json.dumps({**good, "time": "yesterday"}).encode(), "invalid_payload", "time"),
        "no specversion": (json.dumps({k: v for k, v in good.items() if k != "specversion"}).encode(), "invalid_payload", "specversion"),
        "oversized": (json.dumps({**good, "data": {**good["data"], "text": "x" * 70_000}}).encode(), "oversized", None),
        "no value": (None, "empty", None),
    }
    for name, (value, kind, where) in cases.items():
        with pytest.raises((ValidationError, PoisonMessage)) as caught:
            decoder.decode(Record(value))  # type: ignore[arg-type]
            pytest.fail(f"accepted: {name}")
        assert error_type(caught.value) == kind, name
        if where is not None:
            assert [p["loc"] for p in json.loads(describe_error(caught.value))] == [where], name


def test_decoder_of_a_one_type_topic_names_an_unknown_type():
    topic = next(t for t in TOPICS if t.name == "channel.inbound.v1")
    assert len(topic.payloads) == 1
    good = json.loads((EXAMPLES / "ChannelMessagePosted.json").read_text())

    class Record:
        value = json.dumps({**good, "type": "hometeam.ReplyToCustomer"}).encode()
        topic = "channel.inbound.v1"

    with pytest.raises(PoisonMessage) as caught:
        TopicDecoder(topic).decode(Record())  # type: ignore[arg-type]
    assert caught.value.reason == "unknown_type"
    assert "hometeam.ReplyToCustomer" in caught.value.detail


def test_unknown_fields_are_tolerated_on_read():
    topic = next(t for t in TOPICS if t.name == "agent.actions.v1")
    good = json.loads((EXAMPLES / "ReplyToCustomer.json").read_text())
    newer = {**good, "futureattr": 1, "data": {**good["data"], "sentiment": "positive"}}

    class Record:
        value = json.dumps(newer).encode()
        topic = "agent.actions.v1"

    assert TopicDecoder(topic).decode(Record()).payload.agent_id == "sea-ana"  # type: ignore[arg-type]


def test_asyncapi_documents_match_the_apps():
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "asyncapi.py"), "check"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, "docs/asyncapi drifted; run `make docs`:\n" + result.stdout[-4000:]
