"""Conversation-state's customers in memory, made durable per batch by a journal and written
to ``customers`` / ``conversations`` behind it.

On FerretDB a replace costs a transaction per document (~0.7 ms of CPU) and an insert a
small share of one insert command, and most customers change in two batches a second apart
(their message, then the routing decision). So a batch does not rewrite its customers:
it appends one ``conversation_journal`` entry per partition it touched, holding the changed
customer and conversation documents, each changed customer's current conversations even
when unchanged, the batch's outputs as they go to Kafka and its transcript lines (one insert
command). The outputs are published once the entry is in, and the input offsets committed
after that. The lines are stored by a line writer of their own, off the batch's path (at
1,000 msg/s the batches' own line inserts took ~8 ms of each ~20 ms batch): one insert
command at a time, a quarter second after the first line waiting, of every line waiting then
(``unstored_lines``, which the read API shows meanwhile), so the inserts of the batches of a
quarter second are one. A
customer is written to its collections (inserted if new, replaced otherwise) once its oldest
unstored change is ``interval_s`` old (checked every half interval), so the message and the
routing decision that follows it are usually one write; a journal entry is deleted once
every customer it holds is stored and the lines journaled before the write began are. As a customer's newest entry holds all that its document
holds, a flush may rewrite a stored customer by deleting and inserting it (on FerretDB half
the cost of a replace: ``ConversationStore.write_changes``), except one overlaid from entries
another process wrote (an earlier version's entries held only what changed).

Why a journal and not a replay from checkpoints (as team-routing does): conversation-state
reads five topics, and a replay interleaves them differently from the first pass (a routing
decision before the message that opened its conversation would release the placement). The
journal records the state as it was applied, so recovery replays no input.

Memory: a customer kept between batches is its records (``CustomerRecords``) and what the
store holds of it as much as the next write needs: nothing more once stored and unchanged
(``shed_stored``: the records make the same documents), a summary while it has unstored
changes (``summarize_stored``: the ids, the queried fields, what changed), the documents
being written while its slice of the write in flight is (a write makes and writes
``WRITE_SLICE`` customers at a time, and each slice's customers count as stored once it
lands). The journal entries are sent, not kept; the owner's read API makes documents from the
records. ``STATE_MAX_UNSTORED_CUSTOMERS`` bounds the unstored customers (changed, or in the
write in flight) and ``STATE_CACHE_CUSTOMERS`` the rest.

Recovery: after an assignment, a rebalance or a failed batch the memory is dropped, and
before a partition's next record is applied (or by the background loop, whatever comes
first) its journal entries are read, the outputs of those not known to be finished are
published again and their lines stored (a transactional outbox: what the journal holds as
applied is what consumers get, under the same ids and sequence numbers, and what the
transcripts hold), and the entries are overlaid on the stored documents: per customer, the
entry with the highest ``rev`` (a counter the customer document carries) wins unless the
stored document is as new. On revocation the owner stores everything first, so the next owner
normally finds no entries.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from pymongo import DeleteOne

from shared.runtime.checkpoints import CheckpointMetrics, StoreBeforeRevocation, membership_confirmed, membership_lost
from shared.runtime.outbox import OutputRecord
from shared.runtime.store import bulk_write_chunked

from services.conversation_state.lifecycle import CustomerRecords
from services.conversation_state.model import Conversation, Customer
from services.conversation_state.store import (
    ConversationStore,
    LetGo,
    changes_of,
    current_ids,
    customer_fields,
    entry_contents,
    journal_entry,
    keep_current,
    rebuild_stored,
    shed_stored,
    stored_unknown,
    summarize_stored,
    take_held,
    unstored_line,
)

log = logging.getLogger(__name__)

# Customers a write makes documents for and writes at a time (``_store``; the service's
# ``STATE_WRITE_SLICE``): one slice's documents exist at once (~3 KB a customer), and its
# customers count as stored when it lands.
WRITE_SLICE = 500


async def _cannot_publish(records: list[OutputRecord]) -> None:
    raise RuntimeError(f"{len(records)} journaled outputs to publish again, and nothing to publish them with")


class JournaledCustomers:
    def __init__(
        self,
        store: ConversationStore,
        interval_s: float,
        max_clean: int = 20_000,
        metrics: CheckpointMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_unstored: int = 20_000,
        write_slice: int = WRITE_SLICE,
        lines_delay_s: float = 0.25,
    ) -> None:
        self.store = store
        self.interval_s = interval_s
        self.max_clean = max_clean  # stored customers kept in memory (least recently used go first)
        self.max_unstored = max_unstored  # customers with unstored changes before batches wait (``catch_up``)
        self.write_slice = write_slice  # customers a write makes documents for and stores at a time (``_store``)
        self.lines_delay_s = lines_delay_s  # how long a line write waits for more lines to join
        self.metrics = metrics
        self.clock = clock
        self.instance = uuid.uuid4().hex[:12]  # names this process's journal entries
        self.lock = asyncio.Lock()  # batches, captures and recoveries run one at a time
        # Held by a batch from taking its customers until they are journaled (``applying``):
        # the write in flight makes each slice's documents between batches' applications, so
        # it never stores a change before its journal entry (with its outputs) is in.
        self.applying = asyncio.Lock()
        self._landed = asyncio.Event()  # set whenever a slice of the write in flight lands
        self.records: OrderedDict[str, CustomerRecords] = OrderedDict()
        # Conversation id → customer id, for the conversations of the customers not stored yet
        # (unstored or in the write in flight): what the read API finds in memory (``latest``).
        self.owner_of: dict[str, str] = {}
        self.dirty: dict[str, float] = {}  # customer → when its oldest unstored change was journaled (clock)
        self.entries: dict[str, set[str]] = {}  # journal entry → its customers not stored yet (deleted when none)
        # Customers overlaid from journal entries this process did not write (they may not
        # hold every current conversation), until their next entry or store.
        self.overlaid: set[str] = set()
        # Customers a write stored and no batch changed since (so in no write in flight): the
        # next flush sheds their stored documents (``shed_stored``: about half of what a
        # customer kept between batches costs in memory), rebuilt when a batch takes them.
        self.settled: set[str] = set()
        self.writing_customers: set[str] = set()  # the customers the write in flight stores
        self.dirty_and_writing = 0  # customers in both (changed again while their slice is pending)
        self.assigned: set[int] = set()  # partition numbers (the same across the input topics)
        self.recovered: set[int] = set()
        self.epoch = 0  # moves whenever the memory is dropped
        self.writing: asyncio.Task[None] | None = None
        self.write_failed = False  # the last write failed (its customers are dirty again)
        self.last_flush = clock()
        self._n = 0
        # The consumer whose partitions these are (set by the service once it exists): a flush
        # while its group membership has lapsed would write over the next owner's documents.
        self.consumer: Callable[[], AIOKafkaConsumer | None] = lambda: None
        # Publishes journaled outputs again and waits for Kafka (set by the consumer, which owns
        # the outbox): what a recovery finds in entries not known to be finished.
        self.republish: Callable[[list[OutputRecord]], Awaitable[None]] = _cannot_publish
        # Journal entry → partition, for this process's entries whose outputs Kafka acknowledged
        # (``finish``): a recovery does not publish them again.
        self.finished: dict[str, int] = {}
        # The transcript lines of the batches whose outputs are out, not stored yet (waiting or
        # in the line write in flight), by ``_id``: the read API shows them meanwhile
        # (``ConversationStore.read_transcripts``). Each as its BSON (``unstored_line``): a
        # fifth of a dict's memory, and inserted as it is. ``_lines_queued`` counts the lines
        # ``finish`` was given, ``_lines_stored`` how many of the first of them are stored (or
        # dropped: the journal has them): a write deletes journal entries only once the lines
        # given before it began are stored.
        self.unstored_lines: dict[str, Mapping[str, Any]] = {}
        self._lines_waiting: list[tuple[str, Mapping[str, Any]]] = []
        self._lines_queued = 0
        self._lines_stored = 0
        self._lines_failed = False
        self._line_writer: asyncio.Task[None] | None = None

    def _unstored(self, customer_id: str) -> CustomerRecords | None:
        """The records of a customer not stored as they are yet (changed since, or in the write
        in flight), if this process holds one."""
        if customer_id in self.dirty or customer_id in self.writing_customers:
            return self.records.get(customer_id)
        return None

    def latest(self, doc_id: str, customer_id: str | None = None) -> dict[str, Any] | None:
        """The document of a customer (``doc_id`` = customer id, ``Customer.to_doc``'s shape)
        or a conversation of theirs, made from this process's records while they are newer
        than the store (until their write lands), else None. For the read API of the replica
        that owns the customer: what its consumer has applied shows at once (a batch being
        published included; the records are made again from the journal if it fails)."""
        owner = customer_id or self.owner_of.get(doc_id) or doc_id
        r = self._unstored(owner)
        if r is None or r.customer is None:
            return None
        if doc_id == owner:
            return r.customer.to_doc()
        conv = r.conversations.get(doc_id)
        return conv.to_doc() if conv is not None else None

    def conversations_of(self, customer_id: str) -> dict[str, dict[str, Any]]:
        """The conversation documents of a customer newer than the store (see ``latest``)."""
        r = self._unstored(customer_id)
        return {} if r is None else {conv_id: conv.to_doc() for conv_id, conv in r.conversations.items()}

    def _remember(self, records: CustomerRecords) -> None:
        if records.customer is not None:
            for conv_id in records.conversations:
                self.owner_of[conv_id] = records.customer.id

    def _forget(self, records: CustomerRecords) -> None:
        for conv_id in records.conversations:
            self.owner_of.pop(conv_id, None)

    # batches -------------------------------------------------------------------------------
    def take(self, customer_ids: Iterable[str]) -> dict[str, CustomerRecords]:
        found = {}
        for cid in customer_ids:
            r = self.records.get(cid)
            if r is not None:
                if r.stored_derived:
                    rebuild_stored(r)
                found[cid] = r
                self.records.move_to_end(cid)
        return found

    async def recover(self, partitions: Iterable[int]) -> None:
        """Overlay the journal entries of these partitions (left by a process that stopped
        before storing them, or by a batch that failed) on the stored documents, after
        publishing again the outputs they hold that may not be out and storing their lines
        (``_redo``). Call under ``lock``."""
        wanted = [p for p in set(partitions) if p not in self.recovered]
        if not wanted:
            return
        await self.settle()
        entries = await self.store.journal_for(wanted)
        contents = [(raw, entry_contents(raw)) for raw in entries]
        await self._redo(contents, wanted)  # (before anything changes here: a failure leaves nothing half done)
        decoded = [(raw["_id"], entry) for raw, entry in contents]
        stored = await self.store.find_customers({c["_id"] for _, e in decoded for c in e["customers"]})
        stored_rev = {cid: doc.get("rev", -1) for cid, doc in stored.items()}
        newest: dict[str, tuple[int, dict[str, Any]]] = {}  # customer → (rev, doc)
        conversations: dict[str, tuple[int, dict[str, Any]]] = {}  # conversation → (rev of its customer, doc)
        holds: dict[str, set[str]] = {}  # entry → its customers
        for entry_id, entry in decoded:
            holds[entry_id] = {c["_id"] for c in entry["customers"]}
            # What an entry holds of a customer stored as new or newer since is not used at
            # all, conversations included: an entry stays until every customer it holds is
            # stored, so it can be older than a later store of one of them.
            revs = {c["_id"]: c.get("rev", 0) for c in entry["customers"] if c.get("rev", 0) > stored_rev.get(c["_id"], -1)}
            for c in entry["customers"]:
                if c["_id"] in revs and (c["_id"] not in newest or newest[c["_id"]][0] < revs[c["_id"]]):
                    newest[c["_id"]] = (revs[c["_id"]], c)
            for conv in entry["conversations"]:
                rev = revs.get(conv["customer_id"])
                if rev is not None and (conv["_id"] not in conversations or conversations[conv["_id"]][0] <= rev):
                    conversations[conv["_id"]] = (rev, conv)
        overlaid: list[CustomerRecords] = []
        for cid, (rev, doc) in newest.items():
            r = CustomerRecords(customer=Customer.from_doc(doc))
            if cid in stored:
                r.stored[cid] = stored[cid]
            for conv_id, (_, conv) in conversations.items():
                if conv["customer_id"] == cid:
                    r.conversations[conv_id] = Conversation.from_doc(conv)
            overlaid.append(r)
        # The conversations no entry changed are as stored: as the stored customer document
        # holds them, or else in ``conversations``. One held there that is no longer current
        # (a later batch opened another) is kept too: its held copy may be newer than its own
        # document, which the next store then writes.
        for r in overlaid:
            assert r.customer is not None
            take_held(r, stored.get(r.customer.id, {}))
        missing = {x for r in overlaid for x in current_ids(r.customer) if x not in r.conversations}  # type: ignore[arg-type]
        found = await self.store.find_conversations(missing) if missing else {}
        for r in overlaid:
            c = r.customer
            assert c is not None
            for conv_id in current_ids(c):
                if conv_id in found and conv_id not in r.conversations:
                    r.conversations[conv_id] = Conversation.from_doc(found[conv_id])
                    r.stored[conv_id] = found[conv_id]
            self.records[c.id] = r
            self._remember(r)
            self._mark_dirty(c.id)
            self.dirty[c.id] = float("-inf")  # stored at the next flush
            self.settled.discard(c.id)
            self.overlaid.add(c.id)
        overlaid_ids = {r.customer.id for r in overlaid if r.customer is not None}
        for entry_id, customers in holds.items():
            self.entries[entry_id] = customers & overlaid_ids
        self.recovered.update(wanted)
        if entries:
            log.info("recovered %s journal entries (%s customers) of partitions %s", len(entries), len(overlaid), sorted(wanted))

    async def append(
        self,
        loaded: dict[str, CustomerRecords],
        partition_of: dict[str, int],
        outputs: Mapping[int, list[OutputRecord]] | None = None,
        lines: Mapping[int, list[dict[str, Any]]] | None = None,
    ) -> dict[str, int]:
        """Journal what this batch changed with its ``outputs`` (by partition, in the order
        they are to be published) and its transcript ``lines`` (documents, by partition) in
        one insert command, then keep it in memory as dirty. Returns the entries with outputs
        or lines (id → partition): once the outputs are acknowledged and the lines stored,
        tell ``finish``. Call under ``lock``, before the batch's outputs go out."""
        by_partition: dict[int, dict[str, list[Any]]] = {}
        for partition in {*(outputs or {}), *(lines or {})}:
            made, docs = (outputs or {}).get(partition, []), (lines or {}).get(partition, [])
            if made or docs:
                by_partition[partition] = {"customers": [], "conversations": [], "outputs": [r.to_list() for r in made], "lines": docs}
        changed: dict[str, list[str]] = {}  # customer → the documents of theirs changed since stored
        for cid, r in loaded.items():
            if r.customer is None:
                continue
            docs = [c.to_doc() for c in r.conversations.values()]
            doc = r.customer.to_doc()
            if r.summary is not None:
                # Journaled since stored, and what is stored of them summarized: journaled
                # again whole (a batch that changed nothing is a replay of what it applied,
                # rare), not compared with a second copy kept in memory.
                convs = docs
                changed_ids = [d["_id"] for d in docs]
            else:
                before = r.stored
                convs = [d for d in docs if before.get(d["_id"]) != d]
                if not convs and customer_fields(before.get(cid) or {}) == doc:
                    continue
                changed_ids = [d["_id"] for d in convs]
                # The customer's current conversations go with it, changed or not: the entry
                # alone then holds what the customer's document holds (its copies of them,
                # newer than their own documents), which a flush may rewrite by deleting it first.
                current = current_ids(r.customer)
                convs += [d for d in docs if d["_id"] in current and before.get(d["_id"]) == d]
            r.customer.rev += 1
            doc["rev"] = r.customer.rev  # (the document is the batch's own: no second to_doc)
            entry = by_partition.setdefault(partition_of[cid], {"customers": [], "conversations": [], "outputs": [], "lines": []})
            entry["customers"].append(doc)
            entry["conversations"].extend(convs)
            changed[cid] = [cid, *changed_ids]
            self.overlaid.discard(cid)
        to_finish: dict[str, int] = {}
        if by_partition:
            now = datetime.now(UTC)
            docs = []
            for partition, entry in by_partition.items():
                self._n += 1
                docs.append(journal_entry(f"{self.instance}:{self._n:012d}", partition, now, entry))
            await self.store.journal.insert_many(docs)
            for doc, entry in zip(docs, by_partition.values(), strict=True):
                self.entries[doc["_id"]] = {c["_id"] for c in entry["customers"]}
                if entry["outputs"] or entry["lines"]:
                    to_finish[doc["_id"]] = doc["p"]
        journaled_at = self.clock()
        for cid, r in loaded.items():
            if cid in changed:
                summarize_stored(r, changed[cid])  # (what a write needs of them, not a copy)
                self._remember(r)
                self._mark_dirty(cid)
                self.dirty.setdefault(cid, journaled_at)
                self.settled.discard(cid)  # its stored documents are needed again
            elif cid not in self.dirty and cid not in self.writing_customers:
                self.settled.add(cid)  # read and left unchanged: as stored
            self.records[cid] = r
            self.records.move_to_end(cid)
        self._report()
        return to_finish

    def finish(self, entries: Mapping[str, int], lines: Iterable[dict[str, Any]] = ()) -> None:
        """The outputs of these journal entries (id → partition, as ``append`` returned them)
        are acknowledged by Kafka: a recovery by this process does not publish them again. Their
        transcript ``lines`` (documents) go to the line writer."""
        self.finished.update(entries)
        for doc in lines:
            kept = self.unstored_lines[doc["_id"]] = unstored_line(doc)
            self._lines_waiting.append((doc["_id"], kept))
            self._lines_queued += 1
        self.store_lines()

    def store_lines(self) -> None:
        """Start a line write, unless one is in flight (it starts the next when it lands): it
        waits ``lines_delay_s``, then stores every line waiting by then in one insert."""
        if self._lines_waiting and (self._line_writer is None or self._line_writer.done()):
            self._line_writer = asyncio.create_task(self._write_lines(self.epoch))

    async def _write_lines(self, epoch: int) -> None:
        # The batches of the delay share one insert: each insert command is a FerretDB
        # transaction on the database the batches' journal inserts use too (one per batch, in
        # flight beside them, slowed those down under load).
        await asyncio.sleep(self.lines_delay_s)
        if epoch != self.epoch:
            # (lines of the new memory may be waiting behind this one: start them once it ends)
            asyncio.get_running_loop().call_soon(self.store_lines)
            return
        lines, self._lines_waiting = self._lines_waiting, []
        upto = self._lines_queued
        if not lines:
            return
        try:
            await self.store.save_line_docs([doc for _, doc in lines])
        except Exception:
            log.exception("storing transcript lines failed; retrying")
            self._lines_failed = True
            if self.metrics is not None:
                self.metrics.failures.inc()
            if epoch == self.epoch:
                self._lines_waiting[:0] = lines  # (first, again: the next round takes them)
            return
        self._lines_failed = False
        if epoch == self.epoch:
            self._lines_stored = max(self._lines_stored, upto)
            for line_id, doc in lines:
                if self.unstored_lines.get(line_id) is doc:
                    del self.unstored_lines[line_id]
        self.store_lines()

    async def _lines_stored_through(self, count: int, epoch: int) -> bool:
        """Wait until the first ``count`` lines given to ``finish`` are stored; False if a line
        write fails meanwhile (or the memory is dropped: its entries are gone anyway)."""
        while self._lines_stored < count and epoch == self.epoch:
            self.store_lines()
            writer = self._line_writer
            if writer is None or writer.done():  # (nothing in flight, nothing waiting: not to be had)
                return self._lines_stored >= count
            await asyncio.gather(writer, return_exceptions=True)
            if self._lines_failed:
                return False
        return True

    async def _redo(self, entries: list[tuple[dict[str, Any], dict[str, Any]]], partitions: Collection[int]) -> None:
        """Publish again the outputs of these journal entries (of ``partitions``) not known to
        be finished (their batch failed after journaling, or another process wrote them and
        stopped), and store the transcript lines of every one of them (an entry stays until its
        lines are stored, and those of this process's batches wait in memory for the line
        writer, which a drop forgets). Outputs oldest entry first, and Kafka's acknowledgement
        awaited, before anything else is applied: each customer's outputs keep their order.
        Consumers drop what they already have by id (the records are the same bytes, sequence
        numbers included); a line stored again at its position is the same, and not rewritten."""
        present = {raw["_id"] for raw, _ in entries}
        self.finished = {e: p for e, p in self.finished.items() if p not in partitions or e in present}
        pending = sorted(
            (raw["at"], raw["_id"], raw["p"], contents)
            for raw, contents in entries
            if (contents.get("outputs") and raw["_id"] not in self.finished) or contents.get("lines")
        )
        if not pending:
            return
        made = [
            OutputRecord.from_list(fields)
            for _, entry_id, _, contents in pending
            if entry_id not in self.finished
            for fields in contents.get("outputs", ())
        ]
        lines = [doc for *_, contents in pending for doc in contents.get("lines", ())]
        # (each line with the generation that applied it: an entry a stalled member journaled
        # late does not replace the line a later owner stored at the same position)
        outcomes = await asyncio.gather(
            self.republish(made) if made else asyncio.sleep(0), self.store.save_line_docs(lines), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        self.finished.update({entry_id: partition for _, entry_id, partition, _ in pending})
        log.info("redid %s journal entries: %s records published again, %s lines stored", len(pending), len(made), len(lines))

    # storing -------------------------------------------------------------------------------
    @property
    def due(self) -> bool:
        """Time to store the customers whose changes have aged (every half interval)."""
        return self.clock() - self.last_flush >= self.interval_s / 2

    def store_aged(self) -> None:
        """Store the customers whose oldest unstored change is ``interval_s`` old. Call under
        ``lock``."""
        self.flush(min_age_s=self.interval_s)

    def flush(self, min_age_s: float = 0.0) -> None:
        """Capture the documents of the dirty customers whose oldest unstored change is at
        least ``min_age_s`` old (all of them by default: before giving partitions up) and start
        writing them, then delete the journal entries no longer holding anything unstored
        (unless a write is still in flight). Call under ``lock``."""
        self._shed_settled()  # (while a write is in flight too: none of its customers is settled)
        self.store_lines()  # (again, after a failed line write)
        if self.writing is not None and not self.writing.done():
            return
        if membership_lost(self.consumer()):
            return  # the partitions may be another member's by now (the journal keeps it all)
        now = self.last_flush = self.clock()
        stored_until = time.time() - min_age_s  # once this write lands, every older change is stored
        self._evict_clean()
        ready = {cid for cid, since in self.dirty.items() if now - since >= min_age_s}
        done = {e for e, customers in self.entries.items() if customers <= ready}
        lines_before = self._lines_queued  # (every entry in ``entries`` has its lines among them, or recovered)
        if not ready and not done:
            if self.metrics is not None:
                self.metrics.stored_at.set(stored_until)
            return
        # What the entries held before, to put back if the write fails.
        before = {e: set(customers) for e, customers in self.entries.items() if e in done or customers & ready}
        for e in done:
            del self.entries[e]
        for customers in self.entries.values():
            customers -= ready
        dirty = {cid: self.dirty.pop(cid) for cid in [c for c in self.dirty if c in ready]}  # (in the order journaled: oldest first)
        self.writing_customers = set(dirty)
        self.dirty_and_writing = 0  # (the customers left dirty are not in this write)
        self.writing = asyncio.create_task(
            self._store(dirty, sorted(done), before, stored_until, self.epoch, lines_before, wait_for_lines=min_age_s <= 0)
        )

    async def _store(
        self,
        dirty: dict[str, float],
        done: list[str],
        before: dict[str, set[str]],
        stored_until: float,
        epoch: int,
        lines_before: int,
        wait_for_lines: bool = False,
    ) -> None:
        """Write the customers ``flush`` handed over (``dirty``: each with when its oldest change
        was journaled) under the memory of ``epoch``, ``write_slice`` at a time: each slice's
        documents are made when its turn comes (between batches: ``applying``), written, and
        its customers count as stored as soon as it lands, so a write in flight holds one
        slice's documents, not every customer's, and the unstored count falls as it goes.
        Then the journal entries that hold nothing unstored are deleted if the lines given to
        ``finish`` before the write began (``lines_before``) are stored, or once they are if
        ``wait_for_lines`` (a write of everything: before giving partitions up, so the next
        owner finds no entries), else the next write deletes them. If a slice fails, it
        and the slices after it are stored next time (``_put_back``); after a ``drop`` the
        write stops (the journal keeps what it did not store)."""
        order = list(dirty)
        for start in range(0, len(order), self.write_slice):
            part = order[start : start + self.write_slice]
            async with self.applying:
                if epoch != self.epoch:
                    return
                held = [r for cid in part if (r := self.records.get(cid)) is not None]
                # ``stored`` as it will be once the slice lands, now: what it held of these
                # customers is let go instead of kept beside the documents written (if the
                # write fails, the records no longer claim to know what is stored).
                changes = changes_of(held, mark=True)
                let_go = [(r, keep_current(r)) for r in held]  # older conversations are read again if a record names them
                for _, gone in let_go:
                    for conv_id in gone:
                        self.owner_of.pop(conv_id, None)
                journaled = {r.customer.id for r in held if r.customer is not None and r.customer.id not in self.overlaid}
            try:
                await self.store.write_changes(changes, journaled=journaled, mark=False)
            except Exception:
                self._put_back(order[start:], dirty, before, epoch, let_go)
                return
            del changes
            if epoch == self.epoch:
                self._landed_slice(part)
        if done and self._lines_stored < lines_before and not (wait_for_lines and await self._lines_stored_through(lines_before, epoch)):
            # Lines journaled before the write are not all stored yet: the entries stay, for
            # the next write to delete (an aged write does not wait: waiting kept it in flight
            # and the next one from starting, and under load the unstored customers grew, and
            # backpressure with them).
            if epoch == self.epoch:
                for e in done:
                    self.entries.setdefault(e, set())
            done = []
        try:
            if done:
                await bulk_write_chunked(self.store.journal, [DeleteOne({"_id": e}) for e in done])
                for e in done:
                    self.finished.pop(e, None)
        except Exception:
            self._put_back([], dirty, before, epoch, [])
            return
        self.write_failed = False
        if self.metrics is not None:
            self.metrics.stored_at.set(stored_until)
        self._report()

    def _landed_slice(self, part: list[str]) -> None:
        """A slice of the write in flight is stored: its customers are as stored, unless a
        batch changed them since (dirty again, stored by a later write)."""
        for cid in part:
            if cid in self.writing_customers:
                self.writing_customers.discard(cid)
                if cid in self.dirty:
                    self.dirty_and_writing -= 1
            if cid not in self.dirty:
                if (r := self.records.get(cid)) is not None:
                    self._forget(r)  # stored as they are: the store (and ``stored``) is the reference again
                self.overlaid.discard(cid)
                self.settled.add(cid)
        # Stored customers beyond the cache go now, not when the whole write has landed: the
        # batches it lets go on meanwhile bring others in.
        self._evict_clean()
        self._landed.set()
        self._report()

    def _put_back(
        self,
        unwritten: list[str],
        dirty: dict[str, float],
        before: dict[str, set[str]],
        epoch: int,
        let_go: list[tuple[CustomerRecords, LetGo]],
    ) -> None:
        """A write failed: its ``unwritten`` customers are dirty again (stored next time, with
        whatever they hold by then), the journal entries hold them again (an entry whose
        customers all landed is deleted by the next flush), and the slice that failed (its
        ``let_go``) takes back the conversations it let go and writes every document next time
        (``stored_unknown``)."""
        self.write_failed = True
        log.exception("storing conversation state failed; retrying")
        if self.metrics is not None:
            self.metrics.failures.inc()
        if epoch != self.epoch:
            return
        left = set(unwritten)
        self.writing_customers = set()
        self.dirty_and_writing = 0
        for cid in unwritten:
            since = dirty[cid]
            self.dirty[cid] = min(since, self.dirty.get(cid, since))
        for e, customers in before.items():
            self.entries.setdefault(e, set()).update(customers & left)
        for r, conversations in let_go:
            for conv_id, conv in conversations.items():
                r.conversations.setdefault(conv_id, conv)
            stored_unknown(r)  # every document written in full next time
            self._remember(r)
        self._landed.set()
        self._report()

    @property
    def unstored(self) -> int:
        """Customers not stored as they are: changed since their last write, or in the write
        in flight (one changed again while its slice is pending counts once)."""
        return len(self.dirty) + len(self.writing_customers) - self.dirty_and_writing

    def _mark_dirty(self, customer_id: str) -> None:
        """Count a customer about to be marked dirty once in ``unstored`` if its slice of the
        write in flight is still pending (it stays dirty after the slice lands)."""
        if customer_id not in self.dirty and customer_id in self.writing_customers:
            self.dirty_and_writing += 1

    @property
    def over_limit(self) -> bool:
        """More customers not stored as they are than ``max_unstored``, or as many transcript
        lines waiting for a write."""
        return self.unstored > self.max_unstored or len(self.unstored_lines) > self.max_unstored

    async def catch_up(self, retry_after_s: float = 0.5) -> None:
        """Backpressure: while more than ``max_unstored`` customers are not stored as they are
        (``unstored``: the store is slower than the input), wait while the write in flight
        lands slice by slice (each slice's customers count as stored as it lands), start the
        next when it ends (of the customers whose changes have aged, or else of all), and so
        on until within the limit, before the consumer takes more input. The backlog then stays
        in Kafka (consumer lag), not in this process's memory, which holds at most about
        ``max_unstored`` customers besides its cache (and as many transcript lines, which the
        next write stores first: the same wait). A failed write is retried every
        ``retry_after_s``; a lapsed membership ends the wait (the next batch stops on it). Call
        under ``lock``, after a batch is journaled."""
        if not self.over_limit:
            return
        started = self.clock()
        try:
            while self.over_limit:
                if len(self.unstored_lines) > self.max_unstored:  # (the line writer behind: a slow or failing store)
                    if not await self._lines_stored_through(self._lines_queued, self.epoch):
                        await asyncio.sleep(retry_after_s)
                    continue
                if self.dirty and (self.writing is None or self.writing.done()):
                    # The aged ones first (a customer changed a moment ago usually changes
                    # again soon: its routing decision), all of them if none is.
                    now = self.clock()
                    aged = any(now - since >= self.interval_s for since in self.dirty.values())
                    self.flush(min_age_s=self.interval_s if aged else 0.0)
                    if self.writing is None or self.writing.done():
                        return  # nothing started: the membership lapsed
                await self._progress()
                if self.write_failed and (self.writing is None or self.writing.done()):
                    await asyncio.sleep(retry_after_s)
        finally:
            if self.metrics is not None and self.metrics.backpressure is not None:
                self.metrics.backpressure.inc(max(0.0, self.clock() - started))

    async def _progress(self) -> None:
        """Until a slice of the write in flight lands or the write ends."""
        writing = self.writing
        if writing is None or writing.done():
            return
        self._landed.clear()
        landed = asyncio.ensure_future(self._landed.wait())
        try:
            await asyncio.wait({writing, landed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            landed.cancel()

    async def settle(self) -> None:
        if self.writing is not None:
            await asyncio.gather(self.writing, return_exceptions=True)
        if self._line_writer is not None:
            await asyncio.gather(self._line_writer, return_exceptions=True)

    def drop(self) -> None:
        """Forget everything in memory (the journal keeps what was not stored)."""
        self.records.clear()
        self.owner_of.clear()
        self.dirty.clear()
        self.entries.clear()
        self.unstored_lines.clear()  # (in the journal entries the recovery reads)
        self._lines_waiting = []
        self._lines_stored = self._lines_queued  # (no entry is left to wait for them)
        self.overlaid.clear()
        self.settled.clear()
        self.writing_customers = set()
        self.dirty_and_writing = 0
        self.recovered.clear()
        self.epoch += 1
        if self.metrics is not None:
            self.metrics.rewinds.inc()
            self._report()

    async def flush_when_due(self) -> None:
        """For a background task: recover assigned partitions nothing has arrived for (which
        publishes what their journal entries hold and Kafka did not acknowledge), and store
        what is due; both only while the group coordinator confirms this member."""
        while True:
            await asyncio.sleep(min(self.interval_s / 2, 1.0))
            self.store_lines()  # (again after a failed line write)
            recovering = bool(self.assigned - self.recovered)
            try:
                # (asked before waiting for the lock)
                member = (recovering or self.due) and await membership_confirmed(self.consumer())
            except Exception:  # this loop must outlive any one failure
                log.exception("asking the group coordinator failed; retrying")
                continue
            if not member:
                continue
            async with self.lock:
                if membership_lost(self.consumer()):
                    continue  # (lapsed while the lock was held: a batch, a store before revocation)
                for partition in sorted(self.assigned - self.recovered):  # (one bad entry blocks only its partition)
                    try:
                        await self.recover([partition])
                    except Exception:  # (a recovery that cannot publish must not stop the stores)
                        log.exception("recovering conversation state of partition %s failed; retrying", partition)
                try:
                    if self.due:
                        self.store_aged()
                except Exception:
                    log.exception("storing conversation state failed; retrying")

    def _shed_settled(self) -> None:
        """Shed the stored documents of the customers the last writes stored, unless a batch
        changed them since (under ``lock``: no batch holds them now)."""
        for cid in self.settled:
            r = self.records.get(cid)
            if r is not None and cid not in self.dirty and cid not in self.writing_customers and not r.stored_derived:
                shed_stored(r)
        self.settled.clear()

    def _evict_clean(self) -> None:
        excess = len(self.records) - self.max_clean
        if excess <= 0:
            return
        victims = []
        for cid in self.records:
            if cid not in self.dirty and cid not in self.writing_customers:
                victims.append(cid)
                if len(victims) == excess:
                    break
        for cid in victims:
            self._forget(self.records.pop(cid))

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.unstored.set(self.unstored)

    def rebalance_listener(self) -> ConsumerRebalanceListener:
        return StoreBeforeRevocation(self, lambda: self.consumer())

    def forget_revoked(self, revoked: set[TopicPartition]) -> None:
        self.drop()

    def take_assigned(self, assigned: set[TopicPartition]) -> None:
        self.drop()
        self.assigned = {tp.partition for tp in assigned}
        self.finished = {e: p for e, p in self.finished.items() if p in self.assigned}
