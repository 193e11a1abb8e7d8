"""Pool documents (``pools`` collection): one per pool, written only by the consumer that owns
the pool's partition, with the offsets of the commands already applied to it."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ReplaceOne
from pymongo.asynchronous.database import AsyncDatabase

from shared.runtime.store import bulk_write_chunked, find_by_ids

from shared.contracts.agents import Presence
from shared.contracts.common import Channel, RoutingReason, WaitingOn

from services.team_routing.pool import AgentPresenceState, Placement, PoolState


# Placements are stored as one compressed blob, not as an array of subdocuments: the pool
# document is rewritten at every flush, and a store decodes and re-encodes every element of a
# nested array on each replace (FerretDB 1.24: ~540 ms for a pool document with a few
# thousand placements; a blob: a few ms). It also keeps a pool far below MongoDB's 16 MB
# document limit (~70 bytes per placement compressed instead of ~400). Read it with
# pool_from_doc; PLACEMENTS_FORMAT names the layout below.
PLACEMENTS_FORMAT = "json-rows-zlib/1"
_PLACEMENT_COLUMNS = (
    "conversation_id",
    "customer_id",
    "agent_id",
    "waiting_on",
    "priority",
    "enqueued_at",
    "pool_reason",
    "known_agent_id",
    "known_agent_served_at",
    "assigned_at",
    "home_team_id",
    "channel",
    "opted_out",
)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _ts(value: datetime | None) -> int | None:
    """Exact microseconds since the epoch (a float timestamp can be 1 µs off)."""
    return None if value is None else (value - _EPOCH) // _MICROSECOND


def _dt(value: int | None) -> datetime | None:
    return None if value is None else _EPOCH + value * _MICROSECOND


def _key(p: Placement) -> tuple[Any, ...]:
    """Every stored field of a placement, as it is (what a cached row was encoded from)."""
    return (
        p.conversation_id,
        p.customer_id,
        p.agent_id,
        p.waiting_on,
        p.priority,
        p.enqueued_at,
        p.pool_reason,
        p.known_agent_id,
        p.known_agent_served_at,
        p.assigned_at,
        p.home_team_id,
        p.channel,
        p.opted_out,
    )


def _row(key: tuple[Any, ...]) -> str:
    """A placement as a JSON array, written out directly: the same text ``json.dumps`` gives
    (compact separators, ASCII), at a third of its cost per row."""
    conv, customer, agent, waiting_on, priority, enqueued_at, reason, known, known_at, assigned_at, home, channel, opted_out = key
    return (
        f"[{_str(conv)},{_str(customer)},{_opt_str(agent)},{_str(waiting_on.value)},{int(priority)},"
        f"{_ts(enqueued_at)},{_str(reason.value)},{_opt_str(known)},{_opt_int(_ts(known_at))},"
        f"{_opt_int(_ts(assigned_at))},{_opt_str(home)},{_str(channel.value)},{'true' if opted_out else 'false'}]"
    )


_str = json.encoder.encode_basestring_ascii  # a JSON string literal, quotes included (C)


def _opt_str(value: str | None) -> str:
    return "null" if value is None else _str(value)


def _opt_int(value: int | None) -> str:
    return "null" if value is None else str(value)


_HEAD = json.dumps(list(_PLACEMENT_COLUMNS), separators=(",", ":"))


class PlacementRows:
    """Encodes a pool's placements, re-encoding only the rows that changed since the last call.

    A pool is rewritten at every flush with all its placements, and most of them have not
    changed since the previous flush: encoding every row each time (timestamps to
    microseconds, JSON) was a fifth of team-routing's CPU under load in ``make bench``, whose
    conversations never end. A row is reused while every field of its placement equals what
    it was encoded from (placements are changed in place, so the fields are compared, not
    the objects)."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[tuple[Any, ...], str]] = {}

    def encode(self, placements: Iterable[Placement]) -> bytes:
        old, new, rows = self.rows, {}, []
        for p in placements:
            key = _key(p)
            cached = old.get(p.conversation_id)
            if cached is None or cached[0] != key:
                cached = (key, _row(key))
            new[p.conversation_id] = cached
            rows.append(cached[1])
        self.rows = new  # placements gone from the pool are dropped with the old dict
        return zlib.compress(f"[{_HEAD},[{','.join(rows)}]]".encode(), 1)


def encode_placements(placements: Iterable[Placement]) -> bytes:
    return PlacementRows().encode(placements)


def decode_placements(blob: bytes) -> list[Placement]:
    columns, rows = json.loads(zlib.decompress(blob))
    if tuple(columns) != _PLACEMENT_COLUMNS:
        raise ValueError(f"pool placements stored with columns {columns}, this version reads {list(_PLACEMENT_COLUMNS)}")
    return [
        Placement(
            conversation_id=conv,
            customer_id=customer,
            agent_id=agent,
            waiting_on=WaitingOn(waiting_on),
            priority=priority,
            enqueued_at=_dt(enqueued_at),  # type: ignore[arg-type]  # never None
            pool_reason=RoutingReason(reason),
            known_agent_id=known,
            known_agent_served_at=_dt(known_at),
            assigned_at=_dt(assigned_at),
            home_team_id=home,
            channel=Channel(channel),
            opted_out=opted_out,
        )
        for conv, customer, agent, waiting_on, priority, enqueued_at, reason, known, known_at, assigned_at, home, channel, opted_out in rows
    ]


def pool_to_doc(state: PoolState, rows: PlacementRows | None = None) -> dict[str, Any]:
    """The pool's document; ``rows`` (kept per pool between flushes) spares re-encoding the
    placements that did not change."""
    placements = state.placements.values()
    return {
        "_id": state.pool_id,
        "agents": {a: {"presence": s.presence.value, "idle_since": s.idle_since} for a, s in state.agents.items()},
        # Readable summary; the placements themselves are in the blob.
        "assigned": sum(1 for p in placements if p.agent_id is not None),
        "waiting": sum(1 for p in placements if p.agent_id is None),
        "placements_format": PLACEMENTS_FORMAT,
        "placements": (rows or PlacementRows()).encode(placements),
        # Offsets are stored as a list: topic names contain dots, which MongoDB field names
        # must not.
        "applied": [{"key": k, "offset": v} for k, v in state.applied.items()],
        "surging": state.surging,
    }


def _placements_v0(rows: list[dict[str, Any]]) -> list[Placement]:
    """Placements as stored before PLACEMENTS_FORMAT: an array of subdocuments (read so an
    upgrade resumes from the pools the previous version stored; the next flush rewrites them)."""
    return [
        Placement(
            conversation_id=p["conversation_id"],
            customer_id=p["customer_id"],
            agent_id=p.get("agent_id"),
            waiting_on=WaitingOn(p["waiting_on"]),
            priority=p.get("priority", 0),
            enqueued_at=p["enqueued_at"],
            pool_reason=RoutingReason(p["pool_reason"]),
            known_agent_id=p.get("known_agent_id"),
            known_agent_served_at=p.get("known_agent_served_at"),
            assigned_at=p.get("assigned_at"),
            home_team_id=p.get("home_team_id"),
            channel=Channel(p.get("channel", "app")),
            opted_out=p.get("opted_out", False),
        )
        for p in rows
    ]


def stored_placements(doc: dict[str, Any]) -> list[Placement]:
    """Every placement row of a stored pool document, in either layout."""
    stored = doc.get("placements")
    if not stored:
        return []
    if "placements_format" not in doc and isinstance(stored, list):
        return _placements_v0(stored)
    if doc.get("placements_format") != PLACEMENTS_FORMAT:
        raise ValueError(f"pool {doc['_id']}: unknown placements format {doc.get('placements_format')!r}")
    return decode_placements(stored)


def pool_from_doc(doc: dict[str, Any]) -> PoolState:
    return PoolState(
        pool_id=doc["_id"],
        agents={
            a: AgentPresenceState(presence=Presence(s["presence"]), idle_since=s["idle_since"])
            for a, s in doc.get("agents", {}).items()
        },
        placements={p.conversation_id: p for p in stored_placements(doc)},
        applied={a["key"]: a["offset"] for a in doc.get("applied", [])},
        surging=doc.get("surging", False),
    )


class PoolStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.pools = db["pools"]
        self.checkpoints = db["pool_checkpoints"]  # see shared.runtime.checkpoints

    async def load(self, pool_ids: Iterable[str]) -> dict[str, PoolState]:
        """These pools' stored states (a pool never stored starts empty)."""
        ids = list(dict.fromkeys(pool_ids))
        states = {pid: PoolState(pool_id=pid) for pid in ids}
        for pool_id, doc in (await find_by_ids(self.pools, ids)).items():
            states[pool_id] = pool_from_doc(doc)
        return states

    async def save_docs(self, docs: Iterable[dict[str, Any]]) -> None:
        ops = [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs]
        if ops:
            await bulk_write_chunked(self.pools, ops)
