"""Conversation-state's records: a customer, their conversations, transcript lines.

Plain dataclasses with explicit (de)serialisation to store documents, so the lifecycle rules
stay free of any store or broker types.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from shared.contracts.common import Channel, ConversationStatus, Direction, PoolKind, RoutingReason

OPEN_STATUSES = frozenset({ConversationStatus.WAITING_ON_AGENT, ConversationStatus.WAITING_ON_CUSTOMER})


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}

# A customer's recent inputs (``lifecycle.recent_inputs``) are kept as digests of their ids,
# INPUT_DIGEST_BYTES each, one after the other in one ``bytes``, with their times (whole
# seconds, little-endian uint32, ``pack_seconds``) in another: a customer who wrote before
# carries 64 of them (3-4 KB of id strings in every write of their document, ~9 KB of Python
# objects in memory; packed, 512 + 256 bytes). An input taken for a repeat by mistake needs its
# digest to equal one of the customer's at most 512 others: about 512 / 2**64 (3e-17) per input.
INPUT_DIGEST_BYTES = 8
INPUT_TIME_BYTES = 4
_SECONDS = struct.Struct("<I")
_DOUBLE = struct.Struct("<d")


def input_digest(input_id: str) -> bytes:
    """The digest a customer's recent inputs keep of an input id."""
    return hashlib.blake2b(input_id.encode(), digest_size=INPUT_DIGEST_BYTES).digest()


def holds_digest(digests: bytes, digest: bytes) -> bool:
    """Whether packed ``digests`` hold ``digest`` (at a digest's boundary)."""
    at = digests.find(digest)
    while at != -1:
        if at % INPUT_DIGEST_BYTES == 0:
            return True
        at = digests.find(digest, at + 1)
    return False


def pack_seconds(times: Iterable[float]) -> bytes:
    """Unix times as whole seconds, little-endian uint32s, one after the other."""
    return b"".join(_SECONDS.pack(min(max(int(t), 0), 0xFFFFFFFF)) for t in times)


def unpack_seconds(packed: bytes) -> list[int]:
    return [t for (t,) in _SECONDS.iter_unpack(packed)]


def second_at(packed: bytes, index: int) -> int:
    return _SECONDS.unpack_from(packed, index * INPUT_TIME_BYTES)[0]  # type: ignore[no-any-return]


def pack_doubles(values: Iterable[float]) -> bytes:
    """Numbers as little-endian float64s, one after the other."""
    return b"".join(_DOUBLE.pack(v) for v in values)


def unpack_doubles(packed: bytes) -> list[float]:
    return [v for (v,) in _DOUBLE.iter_unpack(packed)]


def _shallow_doc(record: Any) -> dict[str, Any]:
    """A record's fields as a document (``id`` as ``_id``), with its lists and dicts copied one
    level deep: what ``dataclasses.asdict`` gives for these records (their containers hold
    only scalars) at a fraction of its cost (asdict deep-copies every value; it took 30% of
    conversation-state's CPU when every batch compared each held document)."""
    names = _FIELD_NAMES.get(type(record))
    if names is None:
        names = _FIELD_NAMES[type(record)] = tuple(f.name for f in fields(record))
    doc: dict[str, Any] = {}
    for name in names:
        value = getattr(record, name)
        if type(value) is list:
            value = list(value)
        elif type(value) is dict:
            value = dict(value)
        doc["_id" if name == "id" else name] = value
    return doc


@dataclass(slots=True)
class Customer:
    id: str
    home_team_id: str
    home_team_source: str
    created_at: datetime
    opted_out: bool = False
    authenticated: bool = False
    addresses: dict[str, str] = field(default_factory=dict)
    business_ids: dict[str, str] = field(default_factory=dict)
    last_channel: Channel | None = None
    known_agent_id: str | None = None
    known_agent_served_at: datetime | None = None
    open_conversation_id: str | None = None
    last_conversation_id: str | None = None
    # (an array of doubles: a third of a list's memory; stored packed, ``pack_doubles``)
    reply_gaps_s: array[float] = field(default_factory=lambda: array("d"))
    # The latest inputs applied (``lifecycle.recent_inputs``): their ids' digests, packed
    # (``input_digest``), and when each was applied (its input's time, ``pack_seconds``).
    # Documents stored before 2026-12-05 hold ``recent_input_ids`` / ``recent_input_times``
    # (lists of ids and of times): ``from_doc`` reads them.
    recent_inputs: bytes = b""
    recent_input_at: bytes = b""
    callbacks: dict[str, datetime] = field(default_factory=dict)
    seq: int = 0
    applied: dict[str, int] = field(default_factory=dict)
    rev: int = 0  # moves with every batch that changes the customer (see write_behind)

    def __post_init__(self) -> None:
        if type(self.reply_gaps_s) is not array:
            self.reply_gaps_s = array("d", self.reply_gaps_s)

    def to_doc(self) -> dict[str, Any]:
        """The customer's document. Customers are stored compact (one BSON blob, never
        queried by field), so ``applied`` is stored as a document whose keys are topic names
        with dots (``applied_offsets``), and the reply gaps packed (``reply_gaps``): what a
        customer who wrote before carries then costs a write a third as many objects. Names
        of their own: a version before 2026-12-05 reads such a document as one without them
        (``applied``: a list of ``{key, offset}``, ``reply_gaps_s``: a list), not as an error."""
        doc = _shallow_doc(self)
        del doc["reply_gaps_s"]
        doc["reply_gaps"] = pack_doubles(self.reply_gaps_s)
        doc["applied_offsets"] = doc.pop("applied")  # (a copy: ``_shallow_doc``)
        doc["last_channel"] = self.last_channel.value if self.last_channel else None
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Customer:
        data = {f.name: doc.get(f.name) for f in fields(cls) if f.name in doc and f.name not in ("applied", "reply_gaps_s")}
        data["id"] = doc["_id"]
        if data.get("last_channel"):
            data["last_channel"] = Channel(data["last_channel"])
        # (the keys interned: the same few topic partitions for every customer held in memory)
        if "applied_offsets" in doc:
            data["applied"] = {sys.intern(k): v for k, v in doc["applied_offsets"].items()}
        else:
            data["applied"] = {sys.intern(a["key"]): a["offset"] for a in doc.get("applied") or ()}
        if "reply_gaps" in doc:
            data["reply_gaps_s"] = array("d", unpack_doubles(doc["reply_gaps"]))
        else:
            data["reply_gaps_s"] = array("d", doc.get("reply_gaps_s") or ())
        if "recent_inputs" not in doc and doc.get("recent_input_ids"):
            # (times may be fewer than ids, the earliest ids having none: ``recent_inputs``)
            data["recent_inputs"] = b"".join(input_digest(i) for i in doc["recent_input_ids"])
            data["recent_input_at"] = pack_seconds(doc.get("recent_input_times") or [])
        return cls(**data)


@dataclass(slots=True)
class Conversation:
    id: str
    customer_id: str
    home_team_id: str
    status: ConversationStatus
    opened_at: datetime
    updated_at: datetime
    last_channel: Channel
    pool: PoolKind | None = None
    team_id: str | None = None
    agent_id: str | None = None
    pool_reason: RoutingReason | None = None
    routing_reason: RoutingReason | None = None
    queued_at: datetime | None = None
    assigned_at: datetime | None = None
    first_response_at: datetime | None = None
    last_customer_message_at: datetime | None = None
    last_agent_message_at: datetime | None = None
    waiting_since: datetime | None = None
    inactive_after: datetime | None = None
    resolved_at: datetime | None = None
    closed_at: datetime | None = None
    previous_conversation_id: str | None = None
    inbound_count: int = 0
    outbound_count: int = 0
    # For the KPIs the events carry (see lifecycle): the side that wrote the last line, the
    # customer's first message, and lines added while no team held the conversation (groups
    # of {at, direction, channel, lines, turns}, replaced, never changed in place).
    last_direction: Direction | None = None
    first_customer_message_at: datetime | None = None
    unplaced_lines: list[dict[str, Any]] = field(default_factory=list)
    # Its transcript lines so far, each stored at its position (``Line.seq``); None for a
    # conversation stored before lines had positions: its lines are stored by message id.
    line_count: int | None = 0

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    def to_doc(self) -> dict[str, Any]:
        doc = _shallow_doc(self)
        for key in ("status", "last_channel", "pool", "pool_reason", "routing_reason", "last_direction"):
            value = getattr(self, key)
            doc[key] = value.value if value is not None else None
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Conversation:
        data = {f.name: doc.get(f.name) for f in fields(cls) if f.name in doc}
        data["id"] = doc["_id"]
        data["status"] = ConversationStatus(data["status"])
        data["last_channel"] = Channel(data["last_channel"])
        data.setdefault("line_count", None)  # stored before lines had positions
        for key, enum in (("pool", PoolKind), ("pool_reason", RoutingReason), ("routing_reason", RoutingReason), ("last_direction", Direction)):
            if data.get(key) is not None:
                data[key] = enum(data[key])
        return cls(**data)


def line_id(conversation_id: str, seq: int) -> str:
    """The ``_id`` of a conversation's line at a position (1, 2, ...): a reader that knows the
    conversation's ``line_count`` reads its lines by ``_id``, which every store serves from an
    index (the embedded FerretDB answers any other filter by scanning every line stored)."""
    return f"{conversation_id}|{seq}"


@dataclass(slots=True, frozen=True)
class Line:
    """One message in a transcript, stored at its position in the conversation (``seq``), or
    by its message id where the conversation counts no positions (``line_count`` None)."""

    message_id: str
    conversation_id: str
    customer_id: str
    direction: Direction
    channel: Channel
    text: str
    at: datetime
    agent_id: str | None = None
    attachments: tuple[dict[str, Any], ...] = ()
    seq: int | None = None

    def to_doc(self) -> dict[str, Any]:
        return {
            "_id": self.message_id if self.seq is None else line_id(self.conversation_id, self.seq),
            "message_id": self.message_id,
            "seq": self.seq,
            "conversation_id": self.conversation_id,
            "customer_id": self.customer_id,
            "direction": self.direction.value,
            "channel": self.channel.value,
            "text": self.text,
            "at": self.at,
            "agent_id": self.agent_id,
            "attachments": list(self.attachments),
        }
