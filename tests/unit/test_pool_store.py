"""The stored form of a pool: what team-routing writes at a flush reads back as the same state."""

from __future__ import annotations

import json
import zlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from services.team_routing.pool import AgentPresenceState, Placement, PoolState
from services.team_routing.store import (
    CHANGES,
    MAX_CHANGE_DOCS,
    SNAPSHOT,
    PlacementLog,
    capture,
    decode_placements,
    diff_rows,
    encode_rows,
    pool_from_doc,
    rows_of,
    stored_placements,
)
from shared.contracts.agents import Presence
from shared.runtime.compact import expand_document
from shared.contracts.common import Channel, RoutingReason, WaitingOn

T = datetime(2026, 11, 23, 9, 30, 15, 123457, tzinfo=UTC)
T_MS = T.replace(microsecond=123_000)  # a time as a store keeps it (BSON: milliseconds); placements' rows keep microseconds

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


def blob_of(placements: list[Placement]) -> bytes:
    """The placements as one blob of rows, in order (duplicates kept)."""
    return encode_rows(rows_of([p])[p.conversation_id][1] for p in placements)


class Stored:
    """A store in a dict: what ``PoolStore.save`` writes, applied in its order."""

    def __init__(self) -> None:
        self.pools: dict[str, dict] = {}
        self.placements: dict[str, dict] = {}

    def save(self, state: PoolState, log: PlacementLog) -> PlacementLog:
        write = capture(state, log)
        if write.placements is not None:
            self.placements[write.placements["_id"]] = write.placements
        self.pools[state.pool_id] = write.pool
        for doc_id in write.obsolete:
            self.placements.pop(doc_id, None)
        return write.after

    def load(self, pool_id: str) -> tuple[PoolState, PlacementLog]:
        return pool_from_doc(self.pools[pool_id], self.placements)


def test_pool_round_trips_through_its_documents() -> None:
    state = PoolState(
        pool_id="pnw",
        agents={"a-1": AgentPresenceState(presence=Presence.ONLINE, idle_since=T_MS)},
        placements={p.conversation_id: p for p in PLACEMENTS},
        applied={"routing.commands.v1/3": 41},
        surging=True,
    )
    store = Stored()
    log = store.save(state, PlacementLog())
    doc = store.pools["pnw"]
    # Compact: the summary and the placements' format as fields, the rest in one blob.
    assert set(doc) == {"_id", "assigned", "waiting", "placements_format", "placements", "format", "blob"}
    expanded = expand_document(doc)
    assert (doc["assigned"], doc["waiting"], expanded["placements_from"], expanded["placements_to"]) == (1, 1, 1, 1)
    assert doc["placements_format"] == "pool_placements/1"  # the placements are apart
    # The reader of the version that kept placements inside the pool document (still here
    # for those documents) refuses it rather than reading an empty pool.
    with pytest.raises(ValueError, match="unknown placements format"):
        stored_placements(doc)
    assert store.placements["pnw|1"]["kind"] == SNAPSHOT
    back, back_log = store.load("pnw")
    assert back == state
    assert (back_log.start, back_log.to, back_log.rows) == (log.start, log.to, log.rows)
    # The same document as fields (as stored before 2026-12-05) reads as the same pool.
    store.pools["pnw"] = expanded
    assert store.load("pnw")[0] == state


def test_a_flush_stores_only_the_placements_that_changed_and_a_load_applies_them_in_order() -> None:
    placements = {p.conversation_id: replace(p) for p in PLACEMENTS}
    for n in range(3, 40):  # many placements, so that a few changes stay changes
        placements[f"c-{n}"] = replace(PLACEMENTS[1], conversation_id=f"c-{n}", customer_id=f"cust-{n}")
    state = PoolState(pool_id="pnw", placements=placements)
    store = Stored()
    log = store.save(state, PlacementLog())
    assert store.placements["pnw|1"]["kind"] == SNAPSHOT

    placements["c-1"].agent_id = "a-2"  # changed in place
    del placements["c-2"]
    placements["c-40"] = replace(PLACEMENTS[0], conversation_id="c-40")
    log = store.save(state, log)
    part = store.placements["pnw|2"]
    assert part["kind"] == CHANGES and part["removed"] == ["c-2"]
    assert sorted(p.conversation_id for p in decode_placements(part["rows"])) == ["c-1", "c-40"]
    assert log.changed_since_start == 3

    log = store.save(state, log)  # nothing changed: no placements document
    assert sorted(store.placements) == ["pnw|1", "pnw|2"] and log.to == 2
    placements["c-40"].priority = 5
    placements["c-2"] = replace(PLACEMENTS[1])  # back again
    log = store.save(state, log)
    assert expand_document(store.pools["pnw"])["placements_from"] == 1 and expand_document(store.pools["pnw"])["placements_to"] == 3
    back, back_log = store.load("pnw")
    assert back == state
    assert back_log.changed_since_start == log.changed_since_start == 5
    assert capture(back, back_log).placements is None  # what was loaded is what is stored


def test_a_snapshot_comes_once_the_changes_hold_as_many_rows_or_are_many() -> None:
    placements = {f"c-{n}": replace(PLACEMENTS[1], conversation_id=f"c-{n}") for n in range(10)}
    state = PoolState(pool_id="pnw", placements=placements)
    store = Stored()
    log = store.save(state, PlacementLog())
    kinds = []
    for n in range(12):
        placements[f"c-{n % 10}"].priority = n + 1
        log = store.save(state, log)
        kinds.append(store.placements[f"pnw|{log.to}"]["kind"])
    # One row per flush; the tenth would make the changes as large as a snapshot.
    assert kinds == [CHANGES] * 9 + [SNAPSHOT] + [CHANGES] * 2
    assert sorted(store.placements) == ["pnw|11", "pnw|12", "pnw|13"]  # older ones deleted

    big = {f"c-{n}": replace(PLACEMENTS[1], conversation_id=f"c-{n}") for n in range(10 * MAX_CHANGE_DOCS)}
    state = PoolState(pool_id="big", placements=big)
    log = store.save(state, PlacementLog())
    for n in range(MAX_CHANGE_DOCS + 1):
        big[f"c-{n}"].priority = 1
        log = store.save(state, log)
    assert store.placements[f"big|{log.to}"]["kind"] == SNAPSHOT and log.to == MAX_CHANGE_DOCS + 2
    assert store.load("big")[0] == state


def test_after_a_failed_write_the_next_is_a_snapshot_past_the_seq_it_tried() -> None:
    placements = {p.conversation_id: replace(p) for p in PLACEMENTS}
    state = PoolState(pool_id="pnw", placements=placements)
    store = Stored()
    log = store.save(state, PlacementLog())
    placements["c-1"].priority = 7
    tried = capture(state, log)
    store.placements[tried.placements["_id"]] = tried.placements  # stored; the pool document was not
    log = store.save(state, log.failed())
    assert log.to == log.start == 3 and store.placements["pnw|3"]["kind"] == SNAPSHOT
    assert sorted(store.placements) == ["pnw|3"]  # the one the failed write left is deleted too
    assert store.load("pnw")[0] == state
    # With no placement at all, too: the pool names a snapshot that exists.
    empty = PoolState(pool_id="std")
    log = store.save(empty, PlacementLog())
    log = store.save(empty, log.failed())
    assert store.load("std")[0] == empty


def test_a_missing_or_unknown_placements_document_is_refused() -> None:
    state = PoolState(pool_id="pnw", placements={p.conversation_id: replace(p) for p in PLACEMENTS})
    store = Stored()
    log = store.save(state, PlacementLog())
    state.placements["c-1"].priority = 9
    store.save(state, log)
    del store.placements["pnw|2"]
    with pytest.raises(ValueError, match="missing"):
        store.load("pnw")
    store.placements["pnw|2"] = {**store.placements["pnw|1"], "_id": "pnw|2"}  # a snapshot where changes belong
    with pytest.raises(ValueError, match="'snapshot'"):
        store.load("pnw")


def test_a_pool_stored_by_the_previous_version_is_read() -> None:
    """Before the blob, placements were an array of subdocuments (datetimes as BSON dates)."""
    old = {
        "_id": "pnw",
        "agents": {"a-1": {"presence": "online", "idle_since": T_MS}},
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
    state, log = pool_from_doc(old)
    assert state.placements == {p.conversation_id: p for p in PLACEMENTS}
    assert state.applied == {"routing.commands.v1/3": 41}
    assert log == PlacementLog()  # nothing stored apart: the next flush writes a snapshot
    store = Stored()
    store.save(state, log)
    assert store.load("pnw")[0] == state


def test_a_pool_stored_with_its_placements_inside_is_read() -> None:
    """Before pool_placements, the blob was the pool document's own ``placements``."""
    old = {"_id": "pnw", "placements_format": "json-rows-zlib/1", "placements": blob_of(PLACEMENTS), "applied": []}
    state, log = pool_from_doc(old)
    assert list(state.placements.values()) == PLACEMENTS and log == PlacementLog()


def test_empty_pool_round_trips() -> None:
    state = PoolState(pool_id="std")
    store = Stored()
    store.save(state, PlacementLog())
    assert store.load("std")[0] == state


def test_decoding_keeps_duplicate_rows() -> None:
    assert [p.conversation_id for p in decode_placements(blob_of([PLACEMENTS[0], PLACEMENTS[0]]))] == ["c-1", "c-1"]


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
    blob = blob_of(many)
    assert len(blob) < 100 * len(many)  # a 16 MB document holds well over 100k placements
    assert decode_placements(blob) == many


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format="bson-array/0"), "bson-array/0"),
        (lambda d: d.update(rows=zlib.compress(json.dumps([["conversation_id"], []]).encode())), "columns"),
    ],
)
def test_unknown_layouts_are_refused(change, message: str) -> None:
    store = Stored()
    store.save(PoolState(pool_id="pnw", placements={p.conversation_id: p for p in PLACEMENTS}), PlacementLog())
    change(store.placements["pnw|1"])
    with pytest.raises(ValueError, match=message):
        store.load("pnw")
    old = {"_id": "pnw", "placements_format": "bson-array/0", "placements": b"x"}
    with pytest.raises(ValueError, match="unknown placements format"):
        pool_from_doc(old)


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
    rows, changed, removed = diff_rows({}, placements.values())
    assert rows == rows_of(placements.values()) and len(changed) == 2 and removed == []

    setattr(placements["c-1"], field, value)
    rows, changed, removed = diff_rows(rows, placements.values())
    assert rows == rows_of(placements.values())  # the same rows as encoding afresh
    assert [getattr(p, field) for p in decode_placements(encode_rows(changed))] == [value]  # only c-1 changed
    assert removed == []
    assert diff_rows(rows, placements.values())[1:] == ([], [])  # and nothing more


def test_cached_rows_follow_placements_added_and_removed() -> None:
    placements = {p.conversation_id: replace(p) for p in PLACEMENTS}
    rows, _, _ = diff_rows({}, placements.values())
    del placements["c-1"]
    placements["c-3"] = replace(PLACEMENTS[0], conversation_id="c-3", customer_id="cust-3")
    rows, changed, removed = diff_rows(rows, placements.values())
    assert [p.conversation_id for p in decode_placements(encode_rows(changed))] == ["c-3"]
    assert removed == ["c-1"]
    assert set(rows) == {"c-2", "c-3"}  # a removed placement's row is not kept


def test_rows_are_the_json_of_their_fields() -> None:
    odd = replace(PLACEMENTS[0], conversation_id='c-"4"\\', customer_id="kunde-ü-😀\n", agent_id=None, priority=-3)
    blob = blob_of([odd, PLACEMENTS[1]])
    columns, rows = json.loads(zlib.decompress(blob))
    assert zlib.decompress(blob).decode() == json.dumps([columns, rows], separators=(",", ":"))
    assert decode_placements(blob) == [odd, PLACEMENTS[1]]
