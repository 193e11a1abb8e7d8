"""Which of a customer's documents a store writes (``changes_of``): a conversation whose change
touches no field the read API queries is carried by its customer's document while it is
current, and written in full when new, when a queried field changes, or once it is no longer
current."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from shared.contracts.common import Channel, ConversationStatus

from services.conversation_state.lifecycle import CustomerRecords
from services.conversation_state.model import Conversation, Customer
from services.conversation_state.store import HELD, changes_of, customer_document, summarize_stored

T = datetime(2026, 12, 4, 9, tzinfo=UTC)
CONV = Conversation(
    id="conv_1", customer_id="cus_1", home_team_id="pnw", status=ConversationStatus.WAITING_ON_AGENT,
    opened_at=T, updated_at=T, last_channel=Channel.SMS, team_id="pnw", agent_id="ana", assigned_at=T,
)  # fmt: skip


def counted(c: Conversation) -> Conversation:
    return replace(c, inbound_count=c.inbound_count + 1, updated_at=T + timedelta(seconds=5))


def records_with(conv: Conversation, stored: dict | None, current: bool = True, trailing: bool = False) -> CustomerRecords:
    customer = Customer(id="cus_1", home_team_id="pnw", home_team_source="area_code", created_at=T)
    customer.open_conversation_id = customer.last_conversation_id = conv.id if current else "conv_2"
    r = CustomerRecords(customer=customer, conversations={conv.id: conv})
    if stored is not None:
        r.stored[conv.id] = stored
    if trailing:
        r.trailing.add(conv.id)
    return r


CASES = [
    # (what, conversation now, what the store holds of it, its own document trails?, current?, written as)
    ("unchanged", CONV, CONV.to_doc(), False, True, None),
    ("new", CONV, None, False, True, False),
    ("new, not current", CONV, None, False, False, False),
    ("counters only, current", counted(CONV), CONV.to_doc(), False, True, None),
    ("counters only, not current", counted(CONV), CONV.to_doc(), False, False, True),
    ("status", replace(CONV, status=ConversationStatus.WAITING_ON_CUSTOMER), CONV.to_doc(), False, True, True),
    ("agent", replace(CONV, agent_id="ben"), CONV.to_doc(), False, True, True),
    ("team", replace(CONV, team_id="std", agent_id=None), CONV.to_doc(), False, True, True),
    ("queued", replace(CONV, queued_at=T), CONV.to_doc(), False, True, True),
    ("trailing, counters, current", counted(CONV), CONV.to_doc(), True, True, None),
    ("trailing, unchanged, current", CONV, CONV.to_doc(), True, True, None),
    ("trailing, unchanged, no longer current", CONV, CONV.to_doc(), True, False, True),
    ("unchanged, no longer current", CONV, CONV.to_doc(), False, False, None),
]


@pytest.mark.parametrize(("what", "conv", "stored", "trailing", "current", "written_as"), CASES, ids=[c[0] for c in CASES])
def test_a_conversation_is_written_when_it_must_be(what, conv, stored, trailing, current, written_as) -> None:
    records = records_with(conv, stored, current, trailing)
    changes = changes_of([records])
    assert [(d["_id"], known) for d, known in changes.conversations] == ([] if written_as is None else [(conv.id, written_as)])
    # The customer's document holds the conversation exactly while it is current.
    (customer_doc, _), *_ = changes.customers
    assert customer_doc[HELD] == ([conv.to_doc()] if current else [])
    # A change only the customer's document carries leaves the conversation's own document trailing.
    assert [d["_id"] for _, d in changes.held_only] == (["conv_1"] if current and stored not in (None, conv.to_doc()) and written_as is None else [])


def test_a_customer_document_holding_the_same_is_not_written_again() -> None:
    records = records_with(CONV, CONV.to_doc())
    records.stored["cus_1"] = customer_document(records)
    assert changes_of([records]).customers == []
    records.conversations["conv_1"] = counted(CONV)
    assert [d["_id"] for d, _ in changes_of([records]).customers] == ["cus_1"]  # the held copy changed


def test_marked_as_they_are_made_the_records_hold_what_the_store_will() -> None:
    """``mark=True`` (a write-behind flush): each customer's ``stored`` becomes the documents
    being written as soon as they are made, and a conversation carried only by its customer's
    document is marked as trailing; the same writes as unmarked."""
    queried = records_with(replace(CONV, agent_id="ben"), CONV.to_doc())
    counters = records_with(counted(CONV), CONV.to_doc())
    plain = changes_of([records_with(replace(CONV, agent_id="ben"), CONV.to_doc()), records_with(counted(CONV), CONV.to_doc())])
    marked = changes_of([queried, counters], mark=True)
    assert [d for d, _ in marked.conversations] == [d for d, _ in plain.conversations]
    assert [d for d, _ in marked.customers] == [d for d, _ in plain.customers]
    for records in (queried, counters):
        assert records.stored["conv_1"] == records.conversations["conv_1"].to_doc()
        assert records.stored["cus_1"] == customer_document(records)
    assert queried.trailing == set() and counters.trailing == {"conv_1"}
    assert changes_of([queried, counters]).customers == []  # nothing left to write


@pytest.mark.parametrize(("what", "conv", "stored", "trailing", "current", "written_as"), CASES, ids=[c[0] for c in CASES])
def test_summarized_the_same_documents_are_written(what, conv, stored, trailing, current, written_as) -> None:
    """A customer journaled since stored keeps a summary of what is stored (``summarize_stored``:
    ids, queried fields, what changed since) instead of the documents: the same writes."""
    compared = records_with(conv, stored, current, trailing)
    summarized = records_with(conv, stored, current, trailing)
    summarize_stored(summarized, ["cus_1"] + ([conv.id] if stored not in (None, conv.to_doc()) else []))
    assert summarized.stored == {}
    expected, got = changes_of([compared]), changes_of([summarized], mark=True)
    assert [(d["_id"], known) for d, known in got.conversations] == [(d["_id"], known) for d, known in expected.conversations]
    assert [d["_id"] for _, d in got.held_only] == [d["_id"] for _, d in expected.held_only]
    assert got.customers == expected.customers
    # Marked, the records hold every document as the store will: nothing left to write.
    assert summarized.summary is None and summarized.stored[conv.id] == conv.to_doc()
    assert changes_of([summarized]).conversations == [] and changes_of([summarized]).customers == []


def test_summarized_an_unchanged_customer_holding_an_unchanged_conversation_is_not_written() -> None:
    records = records_with(CONV, CONV.to_doc())
    records.stored["cus_1"] = customer_document(records)
    summarize_stored(records, [])
    assert changes_of([records]).customers == [] and changes_of([records]).conversations == []
    summarize_stored(records, ["conv_1"])  # its held copy changed (counters only)
    records.conversations["conv_1"] = counted(CONV)
    changes = changes_of([records])
    assert [d["_id"] for d, _ in changes.customers] == ["cus_1"] and [d["_id"] for _, d in changes.held_only] == ["conv_1"]


RESOLVED = replace(CONV, status=ConversationStatus.RESOLVED, resolved_at=T)
QUEUE_CASES = [
    # (what, conversation now, what the store holds of it, current?, put in open_conversations as (there already?), taken out?)
    ("new, open", CONV, None, True, False, False),
    ("new, not open", RESOLVED, None, False, None, True),  # nothing known: make sure
    ("a turn: open to open", replace(CONV, status=ConversationStatus.WAITING_ON_CUSTOMER), CONV.to_doc(), True, None, False),
    ("agent", replace(CONV, agent_id="ben"), CONV.to_doc(), True, True, False),
    ("team, queued", replace(CONV, team_id="std", agent_id=None, queued_at=T), CONV.to_doc(), True, True, False),
    ("resolved", RESOLVED, CONV.to_doc(), True, None, True),
    ("reopened", CONV, RESOLVED.to_doc(), True, False, False),
    ("closed stays closed, no longer current", replace(RESOLVED, inbound_count=3), RESOLVED.to_doc(), False, None, False),
    ("counters only, not current (written in full)", counted(CONV), CONV.to_doc(), False, None, False),
]


@pytest.mark.parametrize(("what", "conv", "stored", "current", "put", "taken_out"), QUEUE_CASES, ids=[c[0] for c in QUEUE_CASES])
@pytest.mark.parametrize("summarized", [False, True], ids=["compared", "summarized"])
def test_open_conversations_change_only_where_the_queue_shows_a_difference(what, conv, stored, current, put, taken_out, summarized) -> None:
    """Where queries scan, a team's queue reads ``open_conversations``: a conversation goes in
    when it opens or a field the queue shows it by changes (team, agent, times), and out once
    it is not open; a turn between the two open statuses writes nothing there."""
    records = records_with(conv, stored, current)
    if summarized:
        summarize_stored(records, ["cus_1"] + ([conv.id] if stored not in (None, conv.to_doc()) else []))
    changes = changes_of([records])
    assert [(d["_id"], there) for d, there in changes.opened] == ([] if put is None else [(conv.id, put)])
    assert changes.closed == ([conv.id] if taken_out else [])
