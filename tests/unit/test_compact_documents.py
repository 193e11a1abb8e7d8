"""Compact documents: private state stored as one compressed blob, read back as it was."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.conversation_state.model import Customer, input_digest, pack_seconds
from services.conversation_state.store import JOURNAL_FORMAT, entry_contents, journal_entry
from shared.runtime.compact import COMPACT_FORMAT, compact_document, expand_document

AT = datetime(2026, 11, 23, 17, 4, 5, 123000, tzinfo=UTC)

CUSTOMER = Customer(
    id="cus_1",
    home_team_id="pnw-seattle",
    home_team_source="area_code",
    created_at=AT,
    addresses={"sms": "+12065550147"},
    known_agent_id="a-7",
    known_agent_served_at=AT,
    reply_gaps_s=[12.5, 300.0],
    recent_inputs=input_digest("e1") + input_digest("e2"),
    recent_input_at=pack_seconds([1_800_000_000.0, 1_800_000_001.5]),
    callbacks={"cb-1": AT},
    applied={"messages.received.v1/3": 41},
    seq=7,
    rev=3,
).to_doc()

NESTED = {  # nested documents, lists of documents, nulls, floats, many ids
    "_id": "entry-1",
    "conversations": {"conv-1": {"opened_at": AT, "team": "pnw-seattle", "agent": None, "unplaced": [{"at": AT, "lines": 2}]}},
    "ratio": 0.25,
    "recent_ids": [f"{n * 7919:032x}" for n in range(64)],
}


@pytest.mark.parametrize(
    ("doc", "keep"),
    [
        (CUSTOMER, ()),
        (CUSTOMER, ("rev",)),
        (NESTED, ()),
        ({"_id": "empty"}, ()),
    ],
    ids=["customer", "customer keeping rev", "nested", "only an id"],
)
def test_a_compact_document_expands_to_the_document_it_stands_for(doc: dict, keep: tuple[str, ...]) -> None:
    stored = compact_document(doc, keep)
    assert set(stored) == {"_id", *keep, "format", "blob"}
    assert stored["format"] == COMPACT_FORMAT
    assert expand_document(stored) == doc


def test_datetimes_come_back_aware_in_utc() -> None:
    expanded = expand_document(compact_document(CUSTOMER))
    assert expanded["created_at"] == AT and expanded["created_at"].tzinfo is not None
    # BSON keeps milliseconds: what the store would keep of a plain document too.
    assert expanded["created_at"].microsecond == 123000


def test_a_document_stored_as_fields_before_is_read_as_it_is() -> None:
    assert expand_document(CUSTOMER) == CUSTOMER


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        expand_document({"_id": "cus_1", "format": "msgpack/9", "blob": b""})


def test_the_blob_is_smaller_than_the_fields() -> None:
    import bson

    assert len(bson.encode(compact_document(NESTED))) < len(bson.encode(NESTED))


def test_a_conversation_keeps_the_fields_it_is_queried_by() -> None:
    from services.conversation_state.model import Conversation
    from services.conversation_state.store import CONVERSATION_QUERY_FIELDS
    from shared.contracts.common import Channel, ConversationStatus

    doc = Conversation(
        id="conv-1", customer_id="cus_1", home_team_id="pnw", status=ConversationStatus.WAITING_ON_AGENT,
        opened_at=AT, updated_at=AT, last_channel=Channel.SMS, team_id="pnw", agent_id=None, queued_at=AT,
    ).to_doc()
    stored = compact_document(doc, CONVERSATION_QUERY_FIELDS)
    # The read API's queries (a customer's conversations, a team's queue) and sorts see these.
    assert {k: stored[k] for k in CONVERSATION_QUERY_FIELDS} == {k: doc[k] for k in CONVERSATION_QUERY_FIELDS}
    assert "inbound_count" not in stored and expand_document(stored) == doc


@pytest.mark.parametrize(
    ("fmt", "readable"),
    [
        (JOURNAL_FORMAT, True),  # entries holding the batch's outputs
        (COMPACT_FORMAT, True),  # entries of the version that published before journaling
        ("bson-zlib/3", False),
        (None, False),
    ],
)
def test_a_journal_entry_is_read_only_in_a_format_this_version_knows(fmt, readable) -> None:
    """A later version's entry is refused (the partition stops) rather than recovered without
    what it does not know: an earlier version reading an entry with outputs would have lost them."""
    entry = journal_entry("i:1", 0, datetime(2026, 3, 2, tzinfo=UTC), {"customers": [], "conversations": [], "outputs": []})
    entry["format"] = fmt
    if readable:
        assert entry_contents(entry) == {"customers": [], "conversations": [], "outputs": []}
    else:
        with pytest.raises(ValueError, match="unknown format"):
            entry_contents(entry)
