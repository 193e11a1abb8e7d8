"""Pool documents (``pools`` collection): one per pool, written only by the consumer that owns
the pool's partition, with the offsets of the commands already applied to it; its placements
in ``pool_placements`` (a snapshot, then the changes of each flush: see ``capture``)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import DeleteOne, ReplaceOne
from pymongo.asynchronous.database import AsyncDatabase

from shared.runtime.compact import compact_document, expand_document
from shared.runtime.store import bulk_write_chunked, find_by_ids, insert_absent

from shared.contracts.agents import Presence
from shared.contracts.common import Channel, RoutingReason, WaitingOn

from services.team_routing.pool import AgentPresenceState, Placement, PoolState


# Placements are stored as compressed blobs of rows, not as arrays of subdocuments: a store
# decodes and re-encodes every element of a nested array on each write (FerretDB 1.24: ~540
# ms for a few thousand placements; a blob: a few ms). It also keeps a snapshot far below
# MongoDB's 16 MB document limit (~70 bytes per placement compressed instead of ~400).
# PLACEMENTS_FORMAT names the layout below.
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


# A pool's placements as stored: conversation id → (every stored field, its encoded row).
Rows = dict[str, tuple[tuple[Any, ...], str]]


def rows_of(placements: Iterable[Placement]) -> Rows:
    return {p.conversation_id: (key, _row(key)) for p in placements for key in (_key(p),)}


def diff_rows(before: Rows, placements: Iterable[Placement]) -> tuple[Rows, list[str], list[str]]:
    """The placements' rows now, the rows that differ from ``before`` (new or changed) and
    the conversations ``before`` has that are gone. A row is reused while every field of its
    placement equals what it was encoded from (placements are changed in place, so the fields
    are compared, not the objects): encoding every row at each flush (timestamps to
    microseconds, JSON) was a fifth of team-routing's CPU under load in ``make bench``."""
    now: Rows = {}
    changed: list[str] = []
    for p in placements:
        key = _key(p)
        cached = before.get(p.conversation_id)
        if cached is None or cached[0] != key:
            cached = (key, _row(key))
            changed.append(cached[1])
        now[p.conversation_id] = cached
    removed = [c for c in before if c not in now]
    return now, changed, removed


def encode_rows(rows: Iterable[str]) -> bytes:
    return zlib.compress(f"[{_HEAD},[{','.join(rows)}]]".encode(), 1)


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
    """The placements a pool document holds itself (as stored before ``pool_placements``, in
    either layout of that time)."""
    stored = doc.get("placements")
    if not stored:
        return []
    if "placements_format" not in doc and isinstance(stored, list):
        return _placements_v0(stored)
    if doc.get("placements_format") != PLACEMENTS_FORMAT:
        raise ValueError(f"pool {doc['_id']}: unknown placements format {doc.get('placements_format')!r}")
    return decode_placements(stored)


# A pool's placements are stored apart from its document, in ``pool_placements``: a snapshot
# (every placement) and then, at each flush that changed any, only the rows that changed and
# the conversations that left (``changes``), each an insert numbered ``seq`` and never
# rewritten in place. The pool document, replaced at every flush, is small: its agents, the
# applied offsets and which ``seq`` it reads (``placements_from`` .. ``placements_to``, a
# snapshot first). Rewriting a pool's document with all its placements at every flush cost
# FerretDB ~14 ms per 5,000 placements (~340 KB) every second per team, growing with the
# open conversations (bench: ~6,000 per team; a large team: far more).
SNAPSHOT, CHANGES = "snapshot", "changes"
PLACEMENTS_APART = "pool_placements/1"
# A new snapshot once the changes since the last one hold as many rows as it would, or there
# are this many of them (each is a read when the pool is loaded).
MAX_CHANGE_DOCS = 100


def placements_doc_id(pool_id: str, seq: int) -> str:
    return f"{pool_id}|{seq}"


@dataclass(slots=True)
class PlacementLog:
    """What of a pool's placements is stored: their rows as of ``to`` (the last ``seq``
    written; 0: none), the snapshot they start from, how many changed rows came after it, and
    the lowest ``seq`` that may still be stored (older ones are deleted once a snapshot
    supersedes them)."""

    rows: Rows = field(default_factory=dict)
    start: int = 0  # seq of the snapshot
    to: int = 0
    changed_since_start: int = 0
    kept_from: int = 1
    snapshot_next: bool = False

    def failed(self) -> PlacementLog:
        """What is known after a write from this log failed somewhere: the pool document may
        or may not name the ``seq`` it tried, so the next write is a snapshot past it."""
        return PlacementLog(self.rows, self.start, self.to + 1, self.changed_since_start, self.kept_from, snapshot_next=True)


@dataclass(slots=True)
class PoolWrite:
    """One pool's part of a flush: the placements document to insert (none if no placement
    changed), the pool document, the superseded ``seq`` to delete after both, and the log
    once all of it is stored."""

    placements: dict[str, Any] | None
    pool: dict[str, Any]
    obsolete: list[str]
    after: PlacementLog


def capture(state: PoolState, log: PlacementLog) -> PoolWrite:
    """What to store of a pool now, given what is stored (``log``). Pure."""
    rows, changed, removed = diff_rows(log.rows, state.placements.values())
    seq = log.to + 1
    placements: dict[str, Any] | None = None
    after = PlacementLog(rows, log.start, log.to, log.changed_since_start, log.kept_from)
    obsolete: list[str] = []
    snapshot = log.to == 0 or log.snapshot_next or (
        (changed or removed)
        and (log.to - log.start >= MAX_CHANGE_DOCS or log.changed_since_start + len(changed) + len(removed) >= len(rows))
    )
    if snapshot:
        placements = {"_id": placements_doc_id(state.pool_id, seq), "kind": SNAPSHOT, "format": PLACEMENTS_FORMAT, "rows": encode_rows(r for _, r in rows.values())}
        obsolete = [placements_doc_id(state.pool_id, n) for n in range(log.kept_from, seq)]
        after = PlacementLog(rows, seq, seq, 0, seq)
    elif changed or removed:
        placements = {"_id": placements_doc_id(state.pool_id, seq), "kind": CHANGES, "format": PLACEMENTS_FORMAT, "rows": encode_rows(changed), "removed": removed}
        after = PlacementLog(rows, log.start, seq, log.changed_since_start + len(changed) + len(removed), log.kept_from)
    # The stored document keeps the old lowest seq: the obsolete ones are deleted after it.
    return PoolWrite(placements, pool_to_doc(state, after, kept_from=log.kept_from), obsolete, after)


# A pool document's fields kept beside its blob (``shared.runtime.compact``): the readable
# summary, and what makes a version that kept placements inside the pool document refuse it
# (``stored_placements``: a format it does not know) instead of reading an empty pool. The
# rest (each agent's presence, the applied offsets, which placements to read) is packed:
# FerretDB re-encodes every field of a replaced document, and a pool of 50 agents (~6 KB of
# fields) cost it ~0.75 ms of CPU per replace as fields, ~0.18 ms compact.
POOL_FIELDS = ("assigned", "waiting", "placements_format", "placements")


def pool_to_doc(state: PoolState, log: PlacementLog, kept_from: int) -> dict[str, Any]:
    """The pool's document (compact: ``POOL_FIELDS`` as fields); its placements are the
    ``pool_placements`` it names (``log``), of which any from ``kept_from`` may still be
    stored."""
    placements = state.placements.values()
    return compact_document({
        "_id": state.pool_id,
        "agents": {a: {"presence": s.presence.value, "idle_since": s.idle_since} for a, s in state.agents.items()},
        # Readable summary; the placements themselves are in pool_placements.
        "assigned": sum(1 for p in placements if p.agent_id is not None),
        "waiting": sum(1 for p in placements if p.agent_id is None),
        # A version that stored placements inside the pool document refuses this layout (an
        # unknown format) instead of reading a pool without placements (a rolling upgrade
        # that hands a pool back to an older replica, or a rollback).
        "placements_format": PLACEMENTS_APART,
        "placements": "pool_placements",
        "placements_from": log.start,
        "placements_to": log.to,
        "placements_kept_from": kept_from,
        # Offsets are stored as a list: topic names contain dots, which MongoDB field names
        # must not.
        "applied": [{"key": k, "offset": v} for k, v in state.applied.items()],
        "surging": state.surging,
    }, POOL_FIELDS)


def placements_needed(doc: dict[str, Any]) -> list[str]:
    """The ``pool_placements`` ids a pool document (expanded: ``expand_document``) reads, in
    order (none for a document that holds its placements itself, as stored before)."""
    if "placements_to" not in doc or doc["placements_to"] == 0:
        return []
    return [placements_doc_id(doc["_id"], n) for n in range(doc["placements_from"], doc["placements_to"] + 1)]


def pool_from_doc(doc: dict[str, Any], placements_docs: dict[str, dict[str, Any]] | None = None) -> tuple[PoolState, PlacementLog]:
    """The pool a document (compact or as fields) and the ``pool_placements`` it names (by
    id) hold, and what of it is stored."""
    doc = expand_document(doc)
    needed = placements_needed(doc)
    placements = {} if needed else {p.conversation_id: p for p in stored_placements(doc)}
    changed = 0
    for n, doc_id in enumerate(needed):
        part = (placements_docs or {}).get(doc_id)
        if part is None:
            raise ValueError(f"pool {doc['_id']}: placements {doc_id} are missing")
        if part.get("format") != PLACEMENTS_FORMAT or part.get("kind") != (SNAPSHOT if n == 0 else CHANGES):
            raise ValueError(f"pool {doc['_id']}: placements {doc_id} are {part.get('kind')!r} in format {part.get('format')!r}")
        rows = decode_placements(part["rows"])
        if n:
            for conv in part["removed"]:
                placements.pop(conv, None)
            changed += len(rows) + len(part["removed"])
        placements.update((p.conversation_id, p) for p in rows)
    state = PoolState(
        pool_id=doc["_id"],
        agents={
            a: AgentPresenceState(presence=Presence(s["presence"]), idle_since=s["idle_since"])
            for a, s in doc.get("agents", {}).items()
        },
        placements=placements,
        applied={a["key"]: a["offset"] for a in doc.get("applied", [])},
        surging=doc.get("surging", False),
    )
    if not needed:  # never stored apart: the next flush writes a snapshot
        return state, PlacementLog()
    log = PlacementLog(rows_of(placements.values()), doc["placements_from"], doc["placements_to"], changed, doc.get("placements_kept_from", 1))
    return state, log


class PoolStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.pools = db["pools"]
        self.placements = db["pool_placements"]
        self.checkpoints = db["pool_checkpoints"]  # see shared.runtime.checkpoints

    async def load(self, pool_ids: Iterable[str]) -> dict[str, tuple[PoolState, PlacementLog]]:
        """These pools' stored states and what of each is stored (a pool never stored starts
        empty)."""
        ids = list(dict.fromkeys(pool_ids))
        docs = {pid: expand_document(doc) for pid, doc in (await find_by_ids(self.pools, ids)).items()}
        parts = await find_by_ids(self.placements, [i for d in docs.values() for i in placements_needed(d)])
        loaded = {pid: (PoolState(pool_id=pid), PlacementLog()) for pid in ids}
        loaded.update((pid, pool_from_doc(doc, parts)) for pid, doc in docs.items())
        return loaded

    async def save(self, writes: Iterable[PoolWrite]) -> None:
        """Each pool's new placements (insert-first: one a failed write stored already is
        replaced), then the pool documents naming them, then the superseded placements."""
        writes = list(writes)
        parts = [w.placements for w in writes if w.placements is not None]
        existed = await insert_absent(self.placements, parts)
        if existed:
            await bulk_write_chunked(self.placements, [ReplaceOne({"_id": d["_id"]}, d) for d in parts if d["_id"] in existed])
        await bulk_write_chunked(self.pools, [ReplaceOne({"_id": w.pool["_id"]}, w.pool, upsert=True) for w in writes])
        obsolete = [DeleteOne({"_id": i}) for w in writes for i in w.obsolete]
        if obsolete:
            await bulk_write_chunked(self.placements, obsolete)
