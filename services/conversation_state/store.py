"""Conversation-state's documents: ``customers``, ``conversations`` and ``messages``
(transcript lines, ``_id`` = ``<conversation id>|<position>``, see ``model.line_id``; by
message id in conversations stored before lines had positions), and the
``conversation_journal`` that customers and conversations are written behind
(``write_behind``).

Customers are read only by ``_id``, so they are stored compact (one compressed blob,
``shared.runtime.compact``): on FerretDB that costs an insert a third and a replace about 60%
of what the same customer costs as fields. Conversations keep the fields they are queried
and sorted by (``CONVERSATION_QUERY_FIELDS``: a customer's earlier conversations, a team's
queue) and are compact otherwise (measured: an insert half, a replace two thirds of the cost
as fields).

A customer's document also holds a copy of their current (open or last) conversation
(``HELD``), and that conversation's own document is rewritten only when a field it is
queried by changes (status, team, agent, ...) or when it stops being current: most messages
change only its counters and times, so a message costs one replace instead of two (on
FerretDB each is a transaction). So in ``conversations`` the query fields are always
current, the other fields of a current conversation may trail its customer's copy, and the
copy is what to read (``find_conversation``, ``overlay_held``). Read through this store
(``find_customers``, ``find_conversations``, ``expand_document`` on what a query returns)."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import bson
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import ASCENDING, DESCENDING, DeleteOne, ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from shared.runtime.compact import COMPACT_FORMAT, compact_document, expand_document, pack, unpack
from shared.runtime.store import (
    bulk_write_chunked,
    create_query_index,
    delete_then_insert_is_cheaper,
    find_by_ids,
    insert_absent,
    queries_scan,
)

from services.conversation_state.lifecycle import CustomerRecords, StoredSummary
from services.conversation_state.model import OPEN_STATUSES, Conversation, Customer, Line, line_id

# What the read API queries and sorts conversations by; the rest of a conversation is compact.
CONVERSATION_QUERY_FIELDS = ("customer_id", "opened_at", "team_id", "status", "agent_id", "assigned_at", "queued_at")
_NONE: Mapping[str, Mapping[str, Any]] = {}  # no lines waiting to be stored
OPEN_STATUS_VALUES = frozenset(s.value for s in OPEN_STATUSES)
# Where every query but by ``_id`` scans (FerretDB), the team queue reads ``open_conversations``:
# each open conversation's document as ``conversations`` holds it, written with it whenever a
# field the queue shows it by changes (not on a turn that only moves it between the two open
# statuses: the queue shows the status its customer's document holds), deleted once it is not
# open. So a team's queue scans the open conversations, not every conversation ever stored
# (650 ms per request at 20,000 stored). The marker document (no team) says the collection
# was filled from ``conversations`` once (``fill_open_conversations``).
OPEN_FILLED_MARKER = "~filled"
# The field of a customer document that holds their current conversations' documents.
HELD = "held"
# Lines of a conversation read at most at a time (the read API's largest page), and the
# positions read at a time past a conversation's ``line_count`` (lines not counted yet by
# the stored document: it is written behind, the lines with each batch).
LINES_PER_READ = 200
LINES_PROBED = 8


def current_ids(customer: Customer) -> set[str]:
    """The customer's current conversations: open, and last (the same one while it is open)."""
    return {x for x in (customer.open_conversation_id, customer.last_conversation_id) if x}


def _query_part(doc: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(doc.get(f) for f in CONVERSATION_QUERY_FIELDS)


_STATUS = CONVERSATION_QUERY_FIELDS.index("status")


def _queue_part(query_part: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """What ``open_conversations`` holds a conversation by: its queried fields with its
    status as open or not (None: not open, or not known)."""
    if query_part is None or query_part[_STATUS] not in OPEN_STATUS_VALUES:
        return None
    return (*query_part[:_STATUS], True, *query_part[_STATUS + 1 :])


def _index_open(changes: Changes, doc: dict[str, Any], before: tuple[Any, ...] | None, known: bool) -> None:
    """The ``open_conversations`` write a conversation written with ``before`` (its queried
    fields as stored; ``known`` False: nothing is known of what is stored) needs, if any."""
    now = _queue_part(_query_part(doc))
    was = _queue_part(before) if known else None
    if known and now == was:
        return
    if now is not None:
        changes.opened.append((doc, was is not None))
    elif was is not None or not known:
        changes.closed.append(doc["_id"])


def customer_document(records: CustomerRecords, docs: Mapping[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The customer's document as stored: with their current conversations held (taken from
    ``docs``, conversation documents already made, where given: shared, not copied)."""
    customer = records.customer
    assert customer is not None
    current = current_ids(customer)
    docs = docs or {}
    held = [docs.get(conv_id) or conv.to_doc() for conv_id, conv in records.conversations.items() if conv_id in current]
    return {**customer.to_doc(), HELD: held}


# The journal (``write_behind``): one entry per batch and partition, the changed customers with
# their current conversations, the batch's outputs (``OutputRecord.to_list``) and its
# transcript lines (``Line.to_doc``), until every
# customer in it is stored. Its own format name since entries hold outputs: a process of an
# earlier version stops on such an entry (unknown format) instead of recovering the customers
# without publishing the outputs (the batch that comes again would find its records applied).
# Entries of that earlier format (no outputs: published before they were journaled) are read.
JOURNAL_FORMAT = "journal-bson-zlib/2"
JOURNAL_FORMATS = (COMPACT_FORMAT, JOURNAL_FORMAT)


def journal_entry(entry_id: str, partition: int, at: datetime, contents: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """A journal document: the changed documents as one compressed BSON blob (FerretDB stores
    and deletes an opaque blob for a fraction of what the same documents cost nested)."""
    return {
        "_id": entry_id,
        "p": partition,
        "at": at,
        "customers": len(contents["customers"]),
        "format": JOURNAL_FORMAT,
        "blob": pack(contents),
    }


def entry_contents(entry: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    if entry.get("format") not in JOURNAL_FORMATS:
        raise ValueError(f"journal entry {entry['_id']}: unknown format {entry.get('format')!r}")
    return unpack(entry["blob"])  # type: ignore[return-value]


_LINE_CODEC = CodecOptions(document_class=dict, tz_aware=True, tzinfo=UTC)
_RAW_LINE_CODEC = CodecOptions(document_class=RawBSONDocument, tz_aware=True, tzinfo=UTC)


def unstored_line(doc: dict[str, Any]) -> Mapping[str, Any]:
    """A transcript line waiting for the next write: at a position, as its BSON (read with
    ``line_doc``); by message id (a conversation stored before lines had positions, which the
    read API finds by a query over every line in memory), as it is."""
    return doc if doc.get("seq") is None else RawBSONDocument(bson.encode(doc), _RAW_LINE_CODEC)


def line_doc(line: Mapping[str, Any]) -> dict[str, Any]:
    """A waiting line as a document (decoded afresh: the waiting BSON keeps no decoded copy)."""
    if isinstance(line, RawBSONDocument):
        return bson.decode(line.raw, _LINE_CODEC)
    return dict(line)


def _but_gen(line: Mapping[str, Any]) -> dict[str, Any]:
    """A line's document without its ``gen``, its times as the store keeps them (milliseconds)."""
    return {k: v.replace(microsecond=v.microsecond // 1000 * 1000) if isinstance(v, datetime) else v for k, v in line.items() if k != "gen"}


def held_conversations(customer_doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The conversation documents a stored customer document holds, by id (none if it was
    stored before customers held them)."""
    return {d["_id"]: d for d in customer_doc.get(HELD) or ()}


def take_held(records: CustomerRecords, customer_doc: Mapping[str, Any]) -> None:
    """Add the conversations a stored customer document holds to the records (unless they
    have them already), as stored, with their own documents possibly trailing."""
    for conv_id, held in held_conversations(customer_doc).items():
        if conv_id not in records.conversations:
            conv = Conversation.from_doc(held)
            records.conversations[conv_id] = conv
            records.stored[conv_id] = conv.to_doc()
            records.trailing.add(conv_id)


def shed_stored(records: CustomerRecords) -> None:
    """Forget ``stored`` of a customer that is stored and unchanged since (their records' own
    documents are what the store holds); ``rebuild_stored`` makes it again."""
    records.stored.clear()
    records.stored_derived = True


def rebuild_stored(records: CustomerRecords) -> None:
    """``stored`` of a customer shed by ``shed_stored``: their conversations' documents and
    their customer document holding the current ones, made from the records as ``load`` makes
    them from what it reads."""
    docs: dict[str, dict[str, Any]] = {conv_id: conv.to_doc() for conv_id, conv in records.conversations.items()}
    if records.customer is not None:
        docs[records.customer.id] = customer_document(records, docs)
    records.stored = docs
    records.stored_derived = False


def summarize_stored(records: CustomerRecords, changed: Iterable[str]) -> None:
    """Keep of what the store holds of a customer just what a write needs, once a change of
    theirs is journaled (``write_behind``: until it is stored the records are what to write,
    and their stored documents cost as much memory again): each stored document's id with
    its queried fields, and the documents ``changed`` since (accumulated until the write,
    which makes ``stored`` whole again: ``changes_of(..., mark=True)``). Documents added to
    ``stored`` meanwhile (a conversation read for a later batch) are folded in."""
    summary = records.summary
    if summary is None:
        summary = records.summary = StoredSummary({})
    customer_id = records.customer.id if records.customer is not None else None
    for doc_id, doc in records.stored.items():
        summary.queried[doc_id] = None if doc_id == customer_id else _query_part(doc)
    records.stored.clear()
    summary.changed.update(changed)


def customer_fields(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A customer document without the conversations it holds (``Customer.to_doc``'s shape)."""
    return {k: v for k, v in doc.items() if k != HELD}


class ConversationStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.customers = db["customers"]
        self.conversations = db["conversations"]
        self.messages = db["messages"]
        self.journal = db["conversation_journal"]
        self.open_conversations = db["open_conversations"]

    async def ensure_indexes(self) -> None:
        await create_query_index(self.conversations, [("customer_id", ASCENDING), ("opened_at", DESCENDING)])
        await create_query_index(self.conversations, [("team_id", ASCENDING), ("status", ASCENDING)])
        await create_query_index(self.messages, [("conversation_id", ASCENDING), ("at", ASCENDING)])
        await self.fill_open_conversations()

    async def fill_open_conversations(self) -> int:
        """Where queries scan: put the open conversations ``conversations`` holds into
        ``open_conversations`` once per database (a database written by a version before it
        existed; the marker says it was done), before this replica applies anything. Returns
        how many it put there. One that is there already stays as it is."""
        if not await queries_scan(self.conversations) or await self.open_conversations.find_one({"_id": OPEN_FILLED_MARKER}):
            return 0
        docs = [d async for d in self.conversations.find({"status": {"$in": sorted(OPEN_STATUS_VALUES)}})]
        existed = await insert_absent(self.open_conversations, docs)
        await insert_absent(self.open_conversations, [{"_id": OPEN_FILLED_MARKER}])
        return len(docs) - len(existed)

    async def _write_open_conversations(self, changes: Changes) -> None:
        """``open_conversations`` after ``conversations`` (``Changes.opened``, ``closed``)."""
        if changes.closed:
            await bulk_write_chunked(self.open_conversations, [DeleteOne({"_id": doc_id}) for doc_id in changes.closed])
        there = {d["_id"] for d, known in changes.opened if known}
        await _upsert(self.open_conversations, changes.opened, CONVERSATION_QUERY_FIELDS, delete_first=there)

    async def find_customers(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The stored customer documents with these ids (absent ones left out), by id."""
        return {cid: expand_document(doc) for cid, doc in (await find_by_ids(self.customers, ids)).items()}

    async def find_customer(self, customer_id: str) -> dict[str, Any] | None:
        """The customer's document, for a reader that does not own the customer (see
        ``read_customers``)."""
        return (await self.read_customers([customer_id])).get(customer_id)

    async def read_customers(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The customer documents with these ids, for a reader that does not own them (the
        read API): a customer not in ``customers`` may be between the owner's delete and insert
        (``write_changes``) or not stored yet, and its newest journal entry (deleted only once
        it is stored) then holds it, as its document would. One missing from both is read
        again: if the entry was deleted, the insert landed first."""
        ids = set(ids)
        found = await self.find_customers(ids)
        if missing := ids - found.keys():
            found |= await self.journaled_customers(missing)
            if missing := ids - found.keys():
                found |= await self.find_customers(missing)
        return found

    async def journaled_customers(self, ids: Collection[str]) -> dict[str, dict[str, Any]]:
        """These customers as their newest journal entries hold them (highest ``rev``), as
        their documents would hold them: with the current conversations the entry carries. A
        scan of the whole journal (it holds only what is not stored yet: ~1.5
        ``STATE_FLUSH_INTERVAL_S`` of batches), which each unknown customer's 404 costs too."""
        newest: dict[str, tuple[int, dict[str, Any], list[dict[str, Any]]]] = {}
        async for raw in self.journal.find({}):
            contents = entry_contents(raw)
            for c in contents["customers"]:
                if c["_id"] in ids and (c["_id"] not in newest or newest[c["_id"]][0] < c.get("rev", 0)):
                    newest[c["_id"]] = (c.get("rev", 0), c, contents["conversations"])
        out = {}
        for cid, (_, doc, conversations) in newest.items():
            current = {doc.get("open_conversation_id"), doc.get("last_conversation_id")} - {None}
            out[cid] = {**doc, HELD: [d for d in conversations if d["_id"] in current and d["customer_id"] == cid]}
        return out

    async def find_conversations(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The stored conversation documents with these ids (absent ones left out), by id."""
        return {cid: expand_document(doc) for cid, doc in (await find_by_ids(self.conversations, ids)).items()}

    async def find_conversation(self, conversation_id: str) -> dict[str, Any] | None:
        """The conversation as current as the store has it (its customer's copy if held)."""
        doc = await self.conversations.find_one({"_id": conversation_id})
        return (await self.overlay_held([expand_document(doc)]))[0] if doc is not None else None

    async def overlay_held(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Conversation documents read from ``conversations`` (expanded), each replaced by its
        customer's copy where the customer's document holds one (see the module's doc)."""
        customers = await self.read_customers({d["customer_id"] for d in docs})
        held: dict[str, dict[str, Any]] = {}
        for customer in customers.values():
            held.update(held_conversations(customer))
        return [held.get(d["_id"], d) for d in docs]

    async def earlier_conversations(self, conversation: Mapping[str, Any], known: Mapping[str, dict[str, Any]] = {}) -> list[dict[str, Any]]:
        """The customer's conversations before this one, newest first, read one by one by
        ``_id`` along ``previous_conversation_id`` (every conversation opens with the
        customer's last one as its previous): where queries scan (FerretDB) a customer's
        history costs a point read per conversation, not a scan of every conversation stored.
        ``known``: documents to take instead of the stored ones (not stored yet). Stops at one
        found nowhere."""
        out: list[dict[str, Any]] = []
        seen = {conversation["_id"]}
        previous = conversation.get("previous_conversation_id")
        while previous and previous not in seen:
            seen.add(previous)
            doc = known.get(previous) or (await self.find_conversations([previous])).get(previous)
            if doc is None:
                break
            out.append(doc)
            previous = doc.get("previous_conversation_id")
        return out

    async def journal_for(self, partitions: Iterable[int]) -> list[dict[str, Any]]:
        """The journal entries of these partitions, oldest first (the journal holds only what
        is not stored yet, so this scan stays small)."""
        return [d async for d in self.journal.find({"p": {"$in": list(partitions)}}).sort("_id", ASCENDING)]

    async def save_lines(self, lines: list[Line], generation: int = 0) -> None:
        """Insert the lines, each marked with the consumer group ``generation`` that applied
        it. One whose ``_id`` exists: by message id, the same line stored before; at a
        position, a replay after a crash or rebalance, which may have applied the records of
        several topics in another order than the first run (a line's position is where the
        replay put it): the replay's line replaces it, so the positions agree with the
        conversation's ``line_count`` as the replay journals it, unless a later generation
        stored it (a consumer that stalled past its session writing after the partition's new
        owner: the owner's line stays)."""
        await self.save_line_docs([{**line.to_doc(), "gen": generation} for line in lines])

    async def save_line_docs(self, docs: list[Mapping[str, Any]]) -> None:
        """``save_lines`` of the lines' documents (``Line.to_doc`` with the ``gen`` that applied
        each: as a journal entry holds them). A line already stored as it is (a recovery
        storing an entry's lines again) is not rewritten."""
        if not docs:
            return
        existed = await insert_absent(self.messages, docs)
        if not existed:
            return
        at_positions = [d for d in docs if d["_id"] in existed and d["seq"] is not None]
        if at_positions:
            # Read, then replace by ``_id`` alone: on FerretDB a filter naming any other field
            # (``gen``) scans the collection (measured: 120 ms per replace at 20,000 documents
            # against 0.15 by ``_id``). Not atomic; FerretDB's updates are not isolated anyway.
            stored = await find_by_ids(self.messages, [d["_id"] for d in at_positions])
            again = [
                ReplaceOne({"_id": d["_id"]}, d, upsert=True)
                for d in at_positions
                if (found := stored.get(d["_id"], {})).get("gen", 0) <= d["gen"] and _but_gen(found) != _but_gen(d)
            ]
            if again:
                await bulk_write_chunked(self.messages, again)

    async def read_page(
        self, conversation: Mapping[str, Any], start: int, limit: int, unstored: Mapping[str, Mapping[str, Any]] = _NONE
    ) -> tuple[list[dict[str, Any]], int]:
        """Lines ``start`` to ``start + limit`` (0-based) of a conversation (its document, as
        current as the reader has it; ``read_transcripts``) and how many it has: past its
        ``line_count``, positions are read ``LINES_PROBED`` at a time until one is missing. A
        conversation stored before lines had positions: one query for both. ``unstored``: lines
        not stored yet, by ``_id`` (``JournaledCustomers.unstored_lines``)."""
        count = conversation.get("line_count")
        if count is None:
            every = await self._lines_by_query([conversation["_id"]], unstored)
            return every[conversation["_id"]][start : start + limit], len(every[conversation["_id"]])
        conv_id = conversation["_id"]
        lines = (await self.read_transcripts([conversation], start, limit, trailing={conv_id}, unstored=unstored))[conv_id]
        if lines and len(lines) < limit and start + len(lines) >= count:
            return lines, start + len(lines)  # the page ends where the positions past the count did
        known = max(count, start + len(lines))
        # The positions past what is known to exist, read until one is missing.
        past = await self.read_transcripts(
            [{"_id": conv_id, "line_count": known}], known, sys.maxsize - known, trailing={conv_id}, unstored=unstored
        )
        return lines, known + len(past[conv_id])

    async def _lines_by_query(self, conversation_ids: list[str], unstored: Mapping[str, Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """Every line of these conversations (stored before lines had positions: by message id),
        in time order, those not stored yet included."""
        out: dict[str, list[dict[str, Any]]] = {c: [] for c in conversation_ids}
        seen: set[str] = set()
        cursor = self.messages.find({"conversation_id": {"$in": conversation_ids}}).sort([("at", ASCENDING), ("_id", ASCENDING)])
        async for d in cursor:
            out[d["conversation_id"]].append(d)
            seen.add(d["_id"])
        # (only lines by message id: those at positions, waiting as BSON, are never of these)
        late = [d for d in unstored.values() if type(d) is dict and d.get("conversation_id") in out and d["_id"] not in seen]
        for d in late:
            out[d["conversation_id"]].append(d)
        if late:
            for lines in out.values():
                lines.sort(key=lambda d: (d["at"], d["_id"]))
        return out

    async def _lines_by_id(self, ids: list[str], unstored: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """The lines of these ``_id``s that exist, those not stored yet from ``unstored``."""
        found = {i: line_doc(unstored[i]) for i in ids if i in unstored} if unstored else {}
        rest = [i for i in ids if i not in found] if found else ids
        return (await find_by_ids(self.messages, rest) if rest else {}) | found

    async def read_transcripts(
        self,
        conversations: Iterable[Mapping[str, Any]],
        start: int = 0,
        limit: int = LINES_PER_READ,
        trailing: Collection[str] = (),
        unstored: Mapping[str, Mapping[str, Any]] = _NONE,
    ) -> dict[str, list[dict[str, Any]]]:
        """Lines ``start`` to ``start + limit`` (0-based) of each of these conversations (their
        documents, as current as the reader has them), by id, in the order they were added:
        the lines at positions in one ``find_by_ids`` (point reads on FerretDB), those of
        conversations stored before lines had positions (``line_count`` None, stored by
        message id) by one query (on FerretDB a scan of every line stored), in time order.
        ``trailing``: conversations whose documents may trail their lines (a current one: it
        is written behind, its lines with each batch): positions past their ``line_count``
        are read too, ``LINES_PROBED`` at a time, until one is missing. (A conversation stops
        being current with its final lines counted.) ``unstored``: lines not stored yet, by
        ``_id``, read as if they were."""
        out: dict[str, list[dict[str, Any]]] = {}
        counted: dict[str, int] = {}
        by_query: list[str] = []
        for conv in conversations:
            out[conv["_id"]] = []
            if conv.get("line_count") is None:
                by_query.append(conv["_id"])
            else:
                counted[conv["_id"]] = conv["line_count"]
        if by_query:
            for conv_id, every in (await self._lines_by_query(by_query, unstored)).items():
                out[conv_id] = every[start : start + limit]
        wanted = {conv_id: range(start + 1, min(start + limit, count) + 1) for conv_id, count in counted.items()}
        found = await self._lines_by_id([line_id(c, seq) for c, seqs in wanted.items() for seq in seqs], unstored)
        beyond: dict[str, int] = {}
        for conv_id, seqs in wanted.items():
            out[conv_id] = [found[i] for i in (line_id(conv_id, seq) for seq in seqs) if i in found]
            if conv_id in trailing and start + limit > counted[conv_id]:
                beyond[conv_id] = max(start, counted[conv_id])
        while beyond:  # LINES_PROBED positions at a time, while all are there
            ids = {conv_id: [line_id(conv_id, after + k) for k in range(1, LINES_PROBED + 1)] for conv_id, after in beyond.items()}
            found = await self._lines_by_id([i for probe in ids.values() for i in probe], unstored)
            for conv_id, probe in ids.items():
                present = list(itertools.takewhile(lambda i: i in found, probe))
                out[conv_id] += [found[i] for i in present][: start + limit - beyond[conv_id]]
                beyond[conv_id] += len(present)
                if len(present) < len(probe) or beyond[conv_id] >= start + limit:
                    del beyond[conv_id]
        return out

    async def load(
        self,
        customer_ids: Iterable[str],
        conversation_ids: Iterable[str],
        cached: dict[str, CustomerRecords] | None = None,
        new: set[str] | frozenset[str] = frozenset(),
    ) -> dict[str, CustomerRecords]:
        """The records of these customers, with their open and last conversations and any
        other conversation named in the batch. ``cached`` records (kept since this consumer
        stored them) are used as they are; ``new`` customers (known to have nothing stored)
        start empty; the rest is read."""
        cached = cached or {}
        ids = list(dict.fromkeys(customer_ids))
        records = {cid: cached.get(cid) or CustomerRecords(customer=None) for cid in ids}
        missing = [cid for cid in ids if cid not in cached and cid not in new]
        wanted = set(conversation_ids)
        for doc in (await self.find_customers(missing)).values():
            customer = Customer.from_doc(doc)
            r = records[customer.id]
            r.customer = customer
            take_held(r, doc)
            # A copy (the model shares the doc's lists); the held documents are those in ``stored``.
            r.stored[customer.id] = customer_document(r, r.stored)
            wanted.update(current_ids(customer))
        wanted -= {conv_id for r in records.values() for conv_id in r.conversations}
        if wanted:
            for conv_id, doc in (await self.find_conversations(wanted)).items():
                conv = Conversation.from_doc(doc)
                if conv.customer_id in records:
                    records[conv.customer_id].conversations[conv_id] = conv
                    records[conv.customer_id].stored[conv_id] = conv.to_doc()
        return records

    async def save(self, records: Iterable[CustomerRecords], lines: list[Line]) -> None:
        """Write lines first, then conversations, then customers (which carry the applied
        offsets): a crash in between replays the batch and every write repeats harmlessly.
        Documents equal to what was last stored are not written again. Documents never
        stored nor read (a new customer, a conversation opened in this batch) are inserted,
        all in one command per collection: on FerretDB a replace costs a transaction per
        document. One that exists after all (a replay after a crash) is replaced."""
        await self.save_lines(lines)
        await self.write_changes(changes_of(records))

    async def write_changes(self, changes: Changes, journaled: Collection[str] = (), mark: bool = True) -> None:
        """Conversations before customers (which carry the applied offsets); then the records
        know what the store holds (``mark_written``; ``mark=False``: the caller marked them
        when it took the changes). ``journaled``: customers whose newest journal entry holds
        them with their current conversations and stays until this returns
        (``write_behind``); where the store does it for less (FerretDB:
        ``delete_then_insert_is_cheaper``), such a customer, if stored, is rewritten by
        deleting and inserting it. A crash in between leaves the journal's copy, which the
        next owner overlays; until the insert lands, another replica's read API reads the
        customer from that entry (``read_customers``)."""
        await _upsert(self.conversations, changes.conversations, CONVERSATION_QUERY_FIELDS)
        if (changes.opened or changes.closed) and await queries_scan(self.conversations):
            await self._write_open_conversations(changes)
        by_delete = journaled if changes.customers and await delete_then_insert_is_cheaper(self.customers) else ()
        await _upsert(self.customers, changes.customers, delete_first=by_delete)
        if mark:
            mark_written(changes)


@dataclass(slots=True)
class Changes:
    """What differs from the store: (document, stored or read before?) per collection, which
    records each written document belongs to, and which conversations only their customer's
    document carries once written (their own documents trail)."""

    conversations: list[tuple[dict[str, Any], bool]] = field(default_factory=list)
    customers: list[tuple[dict[str, Any], bool]] = field(default_factory=list)
    # ``open_conversations`` (where queries scan): documents to put there (and whether they
    # are there already), ids to take out
    opened: list[tuple[dict[str, Any], bool]] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    written: list[tuple[CustomerRecords, dict[str, Any]]] = field(default_factory=list)
    held_only: list[tuple[CustomerRecords, dict[str, Any]]] = field(default_factory=list)


def mark_written(changes: Changes) -> None:
    """Make the records' ``stored`` what the store holds once these changes are written: the
    documents written replace what was stored of them (which is then let go)."""
    _mark(changes.written, changes.held_only)


def _mark(written: Iterable[tuple[CustomerRecords, dict[str, Any]]], held_only: Iterable[tuple[CustomerRecords, dict[str, Any]]]) -> None:
    for r, doc in written:
        r.stored[doc["_id"]] = doc
        r.trailing.discard(doc["_id"])
    for r, doc in held_only:  # as the customer's document now holds it
        r.stored[doc["_id"]] = doc
        r.trailing.add(doc["_id"])


def stored_unknown(records: CustomerRecords) -> None:
    """After a write that failed (some of it may have landed, ``mark_written`` assumed it
    all): the records no longer claim to know what the store holds, so the next write writes
    every document, inserting it and replacing it where it exists (``_upsert``)."""
    records.stored.clear()
    records.stored_derived = False
    records.summary = None


def changes_of(records: Iterable[CustomerRecords], mark: bool = False) -> Changes:
    """The documents to write. A current conversation that changed: its own document if it is
    new or a queried field changed, else only its customer's document (which holds it). A
    conversation no longer current: its own document if it changed or trails. The customer
    (holding their current conversations) if that changed. ``mark``: ``mark_written`` each
    customer's records as soon as their changes are made (what they replace is let go before
    the next customer's documents are made: a large write never holds both at once)."""
    changes = Changes()
    for r in records:
        if r.customer is None:
            continue
        if r.summary is not None:
            _summarized_changes(r, changes, mark)
            continue
        written, held_only = len(changes.written), len(changes.held_only)
        current = current_ids(r.customer)
        docs: dict[str, dict[str, Any]] = {}  # each conversation's document, for the customer's to hold
        for conv in r.conversations.values():
            doc = docs[conv.id] = conv.to_doc()
            before = r.stored.get(conv.id)
            if conv.id in current:
                if before == doc:
                    docs[conv.id] = before  # the same document twice in memory: keep one
                    continue
                if before is not None and _query_part(before) == _query_part(doc):
                    changes.held_only.append((r, doc))
                    continue
            elif before == doc and conv.id not in r.trailing:
                continue
            changes.conversations.append((doc, before is not None))
            changes.written.append((r, doc))
            _index_open(changes, doc, _query_part(before) if before is not None else None, before is not None)
        doc = customer_document(r, docs)
        if r.stored.get(r.customer.id) != doc:
            changes.customers.append((doc, r.customer.id in r.stored))
            changes.written.append((r, doc))
        if mark:
            _mark(changes.written[written:], changes.held_only[held_only:])
    return changes


def _summarized_changes(r: CustomerRecords, changes: Changes, mark: bool) -> None:
    """``changes_of`` for a customer whose stored documents are summarized
    (``summarize_stored``): the same decisions, from the summary's queried fields and changed
    documents instead of comparing documents. Marked, ``stored`` is whole again: every
    document as it is now."""
    summary = r.summary
    assert summary is not None and r.customer is not None
    current = current_ids(r.customer)
    docs: dict[str, dict[str, Any]] = {}
    written, held_only = len(changes.written), len(changes.held_only)
    for conv in r.conversations.values():
        doc = docs[conv.id] = conv.to_doc()
        known = conv.id in summary.queried
        if known and conv.id not in summary.changed and (conv.id in current or conv.id not in r.trailing):
            continue  # as stored
        if known and conv.id in current and summary.queried[conv.id] == _query_part(doc):
            changes.held_only.append((r, doc))
            continue
        changes.conversations.append((doc, known))
        changes.written.append((r, doc))
        _index_open(changes, doc, summary.queried.get(conv.id), known)
    customer_id = r.customer.id
    doc = customer_document(r, docs)
    if customer_id not in summary.queried or customer_id in summary.changed or not current.isdisjoint(summary.changed):
        changes.customers.append((doc, customer_id in summary.queried))
        changes.written.append((r, doc))
    if mark:
        r.summary = None
        r.stored = {**docs, customer_id: doc}
        _mark(changes.written[written:], changes.held_only[held_only:])


# Documents encoded and written at a time by ``_upsert``: a write-behind flush after a backlog
# can hold tens of thousands of customers, and encoding them all before the first write held
# every compact copy at once and the event loop for as long as the encoding took.
UPSERT_SLICE = 500


async def _upsert(
    collection: AsyncCollection,
    docs: list[tuple[dict[str, Any], bool]],
    keep: tuple[str, ...] = (),
    delete_first: Collection[str] = (),
) -> None:
    """Store documents, in their compact form (``keep``: the fields kept as fields),
    ``UPSERT_SLICE`` at a time: insert the ones never stored or read before (and replace those
    of them that turn out to exist), replace the others (those in ``delete_first``: delete
    them, then insert them with the new ones; not atomic, see ``write_changes``)."""
    for start in range(0, len(docs), UPSERT_SLICE):
        part = [(compact_document(d, keep), known) for d, known in docs[start : start + UPSERT_SLICE]]
        new = [d for d, known in part if not known]
        stored = [d for d, known in part if known]
        deleted = [d for d in stored if d["_id"] in delete_first] if delete_first else []
        if deleted:
            await bulk_write_chunked(collection, [DeleteOne({"_id": d["_id"]}) for d in deleted])
            new += deleted
            stored = [d for d in stored if d["_id"] not in delete_first]
        existed = await insert_absent(collection, new)
        ops = [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in stored + [d for d in new if d["_id"] in existed]]
        if ops:
            await bulk_write_chunked(collection, ops)


# Conversations ``keep_current`` let go of, by id.
LetGo = dict[str, Conversation]


def keep_current(records: CustomerRecords) -> LetGo:
    """Keep of a customer's records between batches what is worth keeping: the customer with
    their open and last conversations (an older one is read again if a record names it), and
    what is stored of those. Returns the conversations let go."""
    customer = records.customer
    let_go: LetGo = {}
    if customer is not None:
        keep = current_ids(customer)
        for conv_id in [c for c in records.conversations if c not in keep]:
            let_go[conv_id] = records.conversations.pop(conv_id)
            records.stored.pop(conv_id, None)
    return let_go
