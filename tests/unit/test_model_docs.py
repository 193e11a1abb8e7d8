"""conversation-state's records as store documents: the same fields and values as
``dataclasses.asdict`` would give, containers copied (a later change to the record must not
reach a document already captured for writing), and a lossless round trip."""

from __future__ import annotations

from array import array
from dataclasses import asdict
from datetime import UTC, datetime

import pytest

from services.conversation_state.model import Conversation, Customer, input_digest, pack_doubles, pack_seconds, unpack_doubles
from shared.contracts.common import Channel, ConversationStatus, PoolKind

NOW = datetime(2026, 11, 23, 9, tzinfo=UTC)

CUSTOMER = Customer(
    id="cus_1", home_team_id="pnw", home_team_source="area_code", created_at=NOW, addresses={"sms": "+12065550100"},
    last_channel=Channel.SMS, reply_gaps_s=[30.0], recent_inputs=input_digest("m1"),
    recent_input_at=pack_seconds([1_800_000_000.0]), callbacks={"cb1": NOW}, applied={"messages.received.v1/0": 4}, rev=3,
)  # fmt: skip
CONVERSATION = Conversation(
    id="conv_1", customer_id="cus_1", home_team_id="pnw", status=ConversationStatus.WAITING_ON_AGENT, opened_at=NOW,
    updated_at=NOW, last_channel=Channel.SMS, pool=PoolKind.HOME_TEAM, agent_id="ana",
)  # fmt: skip


def asdict_doc(record: Customer | Conversation) -> dict:
    doc = asdict(record)
    doc["_id"] = doc.pop("id")
    for key in ("status", "last_channel", "pool", "pool_reason", "routing_reason"):
        if key in doc and doc[key] is not None:
            doc[key] = getattr(record, key).value
    if isinstance(record, Customer):  # (stored compact: see ``Customer.to_doc``)
        del doc["applied"], doc["reply_gaps_s"]
        doc["applied_offsets"] = dict(record.applied)
        doc["reply_gaps"] = pack_doubles(record.reply_gaps_s)
    return doc


@pytest.mark.parametrize("record", [CUSTOMER, CONVERSATION])
def test_documents_hold_what_asdict_would_and_round_trip(record) -> None:
    doc = record.to_doc()
    assert doc == asdict_doc(record)
    assert type(record).from_doc(doc) == record
    assert all(type(v) is not array for v in doc.values())  # (BSON has no arrays of doubles)


def test_a_captured_document_does_not_change_with_the_record() -> None:
    customer = Customer.from_doc(CUSTOMER.to_doc())
    doc = customer.to_doc()
    customer.reply_gaps_s.append(60.0)
    customer.addresses["app"] = "user-1"
    customer.callbacks["cb2"] = NOW
    customer.applied["messages.received.v1/0"] = 5
    assert (unpack_doubles(doc["reply_gaps"]), doc["addresses"], list(doc["callbacks"])) == ([30.0], {"sms": "+12065550100"}, ["cb1"])
    assert doc["applied_offsets"] == {"messages.received.v1/0": 4}


def test_a_customer_stored_before_2026_12_05_reads_the_same() -> None:
    """Before 2026-12-05 a customer's document held ``applied`` as a list of ``{key, offset}``,
    its reply gaps as a list and its recent inputs' ids themselves."""
    doc = {k: v for k, v in CUSTOMER.to_doc().items() if k not in ("applied_offsets", "reply_gaps", "recent_inputs", "recent_input_at")}
    doc |= {
        "applied": [{"key": "messages.received.v1/0", "offset": 4}],
        "reply_gaps_s": [30.0],
        "recent_input_ids": ["m1"],
        "recent_input_times": [1_800_000_000.0],
    }
    assert Customer.from_doc(doc) == CUSTOMER


@pytest.mark.parametrize(("stored", "line_count"), [({"line_count": 7}, 7), ({"line_count": None}, None), ({}, None)])
def test_a_conversation_stored_without_a_line_count_counts_no_positions(stored, line_count) -> None:
    """A document from before lines had positions has no ``line_count``: its lines stay stored
    by message id (``Line.seq`` None); a new conversation counts from 0."""
    doc = {k: v for k, v in CONVERSATION.to_doc().items() if k != "line_count"} | stored
    assert Conversation.from_doc(doc).line_count == line_count
    assert CONVERSATION.line_count == 0
