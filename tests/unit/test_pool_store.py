"""The stored form of a pool: what team-routing writes at a flush reads back as the same state."""

from __future__ import annotations

import json
import zlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from services.team_routing.pool import AgentPresenceState, Placement, PoolState
from services.team_routing.store import (
    PLACEMENTS_FORMAT,
    PlacementRows,
    decode_placements,
    encode_placements,
    pool_from_doc,
    pool_to_doc,
)
from shared.contracts.agents import Presence
from shared.contracts.common import Channel, RoutingReason, WaitingOn

T = datetime(2026, 11, 23, 9, 30, 15, 123457, tzinfo=UTC)

PLACEMENTS = [
    # assigned, every optional field set, microseconds that a float timestamp would round
    Placement(
        conversation_id="c-1",
        customer_id="cust-1",
        agent_id="a-1",
        waiting_on=WaitingOn.AGENT,
        priority=2,
        enqueued_at=T,
        pool_reason=RoutingReason.KNOWN_AGENT,
        known_agent_id="a-1",
        known_agent_served_at=T - timedelta(days=3, microseconds=1),
        assigned_at=T + timedelta(seconds=1, microseconds=999_999),
        home_team_id="pnw",
        channel=Channel.SMS,
        opted_out=True,
    ),
    # waiting in the queue, optional fields unset
    Placement(
        conversation_id="c-2",
        customer_id="cust-2",
        agent_id=None,
        waiting_on=WaitingOn.AGENT,
        priority=0,
        enqueued_at=datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        pool_reason=RoutingReason.HOME_TEAM,
    ),
]


def test_pool_round_trips_through_its_document() -> None:
    state = PoolState(
        pool_id="pnw",
        agents={"a-1": AgentPresenceState(presence=Presence.ONLINE, idle_since=T)},
        placements={p.conversation_id: p for p in PLACEMENTS},
        applied={"routing.commands.v1/3": 41},
        surging=True,
    )
    doc = pool_to_doc(state)
    assert (doc["assigned"], doc["waiting"], doc["placements_format"]) == (1, 1, PLACEMENTS_FORMAT)
    assert isinstance(doc["placements"], bytes)
    back = pool_from_doc(doc)
    assert back == state


def test_a_pool_stored_by_the_previous_version_is_read() -> None:
    """Before the blob, placements were an array of subdocuments (datetimes as BSON dates)."""
    old = {
        "_id": "pnw",
        "agents": {"a-1": {"presence": "online", "idle_since": T}},
        "placements": [
            {
                "conversation_id": p.conversation_id,
                "customer_id": p.customer_id,
                "agent_id": p.agent_id,
                "waiting_on": p.waiting_on.value,
                "priority": p.priority,
                "enqueued_at": p.enqueued_at,
                "pool_reason": p.pool_reason.value,
                "known_agent_id": p.known_agent_id,
                "known_agent_served_at": p.known_agent_served_at,
                "assigned_at": p.assigned_at,
                "home_team_id": p.home_team_id,
                "channel": p.channel.value,
                "opted_out": p.opted_out,
            }
            for p in PLACEMENTS
        ],
        "applied": [{"key": "routing.commands.v1/3", "offset": 41}],
        "surging": False,
    }
    state = pool_from_doc(old)
    assert state.placements == {p.conversation_id: p for p in PLACEMENTS}
    assert state.applied == {"routing.commands.v1/3": 41}
    assert pool_from_doc(pool_to_doc(state)) == state  # and the next flush writes the blob


def test_empty_pool_round_trips() -> None:
    state = PoolState(pool_id="std")
    assert pool_from_doc(pool_to_doc(state)) == state


def test_decoding_keeps_duplicate_rows() -> None:
    assert [p.conversation_id for p in decode_placements(encode_placements([PLACEMENTS[0], PLACEMENTS[0]]))] == ["c-1", "c-1"]


def test_placements_are_compact() -> None:
    many = [
        Placement(
            conversation_id=f"{n:032x}",
            customer_id=f"{n * 7:032x}",
            agent_id=f"agent-{n % 35}",
            waiting_on=WaitingOn.AGENT,
            priority=0,
            enqueued_at=T + timedelta(seconds=n),
            pool_reason=RoutingReason.HOME_TEAM,
            assigned_at=T + timedelta(seconds=n + 1),
            home_team_id="pnw",
        )
        for n in range(10_000)
    ]
    blob = encode_placements(many)
    assert len(blob) < 100 * len(many)  # a 16 MB document holds well over 100k placements
    assert decode_placements(blob) == many


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(placements_format="bson-array/0"), "unknown placements format"),
        (lambda d: d.update(placements=zlib.compress(json.dumps([["conversation_id"], []]).encode())), "columns"),
    ],
)
def test_unknown_layouts_are_refused(change, message: str) -> None:
    doc = pool_to_doc(PoolState(pool_id="pnw", placements={p.conversation_id: p for p in PLACEMENTS}))
    change(doc)
    with pytest.raises(ValueError, match=message):
        pool_from_doc(doc)



# Changes made in place between two flushes, each to a field the row caches must notice.
IN_PLACE_CHANGES = [
    ("agent_id", "a-2"),
    ("agent_id", None),
    ("assigned_at", T + timedelta(microseconds=1)),
    ("assigned_at", None),
    ("waiting_on", WaitingOn.CUSTOMER),
    ("priority", 9),
    ("enqueued_at", T - timedelta(microseconds=1)),
    ("pool_reason", RoutingReason.SURGE),
    ("known_agent_id", "a-9"),
    ("known_agent_served_at", None),
    ("home_team_id", "sw"),
    ("channel", Channel.APP),
    ("opted_out", False),
]


@pytest.mark.parametrize(("field", "value"), IN_PLACE_CHANGES, ids=[f"{f}={v}" for f, v in IN_PLACE_CHANGES])
def test_cached_rows_follow_changes_made_in_place(field: str, value: object) -> None:
    placements = {p.conversation_id: replace(p) for p in PLACEMENTS}
    state = PoolState(pool_id="pnw", placements=placements)
    rows = PlacementRows()
    first = pool_to_doc(state, rows)
    assert first["placements"] == pool_to_doc(state)["placements"]  # the same bytes as encoding afresh

    setattr(placements["c-1"], field, value)
    second = pool_to_doc(state, rows)
    assert second["placements"] == pool_to_doc(state)["placements"]
    assert getattr(decode_placements(second["placements"])[0], field) == value
    assert pool_from_doc(second) == state


def test_cached_rows_follow_placements_added_and_removed() -> None:
    state = PoolState(pool_id="pnw", placements={p.conversation_id: replace(p) for p in PLACEMENTS})
    rows = PlacementRows()
    pool_to_doc(state, rows)
    del state.placements["c-1"]
    state.placements["c-3"] = replace(PLACEMENTS[0], conversation_id="c-3", customer_id="cust-3")
    doc = pool_to_doc(state, rows)
    assert [p.conversation_id for p in decode_placements(doc["placements"])] == ["c-2", "c-3"]
    assert set(rows.rows) == {"c-2", "c-3"}  # a removed placement's row is not kept
    assert pool_from_doc(doc) == state


def test_rows_are_the_json_of_their_fields() -> None:
    odd = replace(PLACEMENTS[0], conversation_id='c-"4"\\', customer_id="kunde-ü-😀\n", agent_id=None, priority=-3)
    blob = encode_placements([odd, PLACEMENTS[1]])
    columns, rows = json.loads(zlib.decompress(blob))
    assert zlib.decompress(blob).decode() == json.dumps([columns, rows], separators=(",", ":"))
    assert decode_placements(blob) == [odd, PLACEMENTS[1]]
