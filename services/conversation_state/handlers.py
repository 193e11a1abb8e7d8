"""Conversation-state's consumer: one batch at a time, for all the customer-keyed topics it
owns, so each customer's records have a single writer.

decode → load the batch's customers → apply each record (skipping any already applied) →
journal the changed customers with the batch's outputs (their records as they go to Kafka) and
transcript lines → publish the outputs → return, and the batch is committed. The lines are
stored by the next write behind (``JournaledCustomers._store``), with the customers.

Journaling first (a transactional outbox) means what was published is always what the journal
holds: if publishing fails, or the process dies before the outputs are acknowledged or the
lines stored, whoever recovers the partition publishes the journaled records again (same ids,
same sequence numbers) and stores the lines before applying anything, and the batch that
comes again finds its records applied.
Had the outputs gone out first and the journal failed, the batch would be applied again from
the state before it, and a fetch that mixes the five topics differently (or is cut short by
``max_records``) would number the customer's events differently from what consumers already
have: a new event could take a number an earlier one was published under.
"""

from __future__ import annotations

import asyncio
import sys

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from prometheus_client import Counter, Histogram

from shared.contracts.agents import ReplyToCustomer, ResolveConversation, TransferConversation
from shared.contracts.common import Direction
from shared.contracts.customers import OptInToHomeTeam, OptOutOfHomeTeam, ReassignHomeTeam, ScheduleCallback
from shared.contracts.lifecycle import CloseInactiveConversation, StartCallback
from shared.contracts.messages import CustomerMessageReceived
from shared.contracts.registry import CONVERSATION_EVENTS, MESSAGES_OUTBOUND, ROUTING_COMMANDS
from shared.contracts.routing import ConversationRouted, TransferRefused
from shared.runtime.checkpoints import MembershipLost, group_generation, membership_confirmed, membership_lost
from shared.runtime.decoding import BatchReader, Incoming
from shared.runtime.outbox import Outbox, OutputRecord
from shared.runtime.phases import BatchPhases, NoPhases, PhaseClock
from shared.runtime.tracing import RecordTracer
from shared.teams import DirectoryWatcher

from services.conversation_state import lifecycle
from services.conversation_state.lifecycle import CustomerRecords, Effects, Rules
from services.conversation_state.model import Line
from services.conversation_state.store import ConversationStore
from services.conversation_state.write_behind import JournaledCustomers


_APPLIED_KEYS: dict[tuple[str, int], str] = {}


def applied_key_of(topic: str, partition: int) -> str:
    """The key of ``Customer.applied`` for a topic's partition: one string for every customer
    kept in memory, not one each (a few hundred bytes per customer)."""
    key = _APPLIED_KEYS.get((topic, partition))
    if key is None:
        key = _APPLIED_KEYS[(topic, partition)] = sys.intern(f"{topic}/{partition}")
    return key


class OpeningsFirst:
    """Holds back a routing decision for a conversation not known when its turn comes, with
    every later record of its customer from its partition (so offsets still only grow per
    customer and partition); the consumer applies what was held after the rest of the batch.

    A decision always follows the message that opened its conversation, but a batch that mixes
    topics can hold both the other way round: after a crash, the replayed message and the
    decision team-routing made meanwhile arrive together, in partition order. Applied first,
    the decision would find no conversation and release the placement, and the re-sent route
    request would be decided again (a second assignment). Held back, it finds the
    conversation; one for a conversation that never opens is applied last, and released, as
    before.
    """

    def __init__(self) -> None:
        self.held: list[Incoming[Any]] = []
        self._keys: set[tuple[str, str, int]] = set()  # (customer, topic, partition) held back

    def hold(self, item: Incoming[Any], known: Callable[[str, str], bool]) -> bool:
        """Hold ``item`` back? ``known(customer, conversation)``: does that conversation exist now?"""
        key = (item.payload.customer_id, item.record.topic, item.record.partition)
        if key not in self._keys and not (
            isinstance(item.payload, ConversationRouted) and not known(item.payload.customer_id, item.payload.conversation_id)
        ):
            return False
        self._keys.add(key)
        self.held.append(item)
        return True


PartitionEnds = Callable[[list[TopicPartition]], Awaitable[dict[TopicPartition, int]]]


class FreshRecords:
    """Which customers of a batch are new for certain, so nothing needs to be read for them.

    Ingest flags the first message of a customer it creates (``new_customer``), and
    conversation-state only creates customers from messages, so for such a message nothing
    can be stored yet: unless it is a replay. After a crash or a rebalance the new owner
    handles again what the previous one handled but did not commit, in a different
    interleaving of its five topics: a routing decision for the customer's conversation may
    have been applied and stored before the replayed first message comes round again, and
    rebuilding that customer from nothing would drop it (seen in the crash test). So the flag
    counts only on a record at or past the end its partition had when this consumer first
    looked after taking it (``partition_ends``): anything before may be a replay and is read.
    The boundaries are forgotten whenever the memory is dropped (a rebalance)."""

    def __init__(self, partition_ends: PartitionEnds | None) -> None:
        self.partition_ends = partition_ends
        self.boundaries: dict[TopicPartition, int] = {}
        self.epoch: int | None = None

    async def new_customers(self, incoming: Sequence[Incoming[Any]], epoch: int) -> set[str]:
        flagged = [i for i in incoming if isinstance(i.payload, CustomerMessageReceived) and i.payload.new_customer]
        if not flagged or self.partition_ends is None:
            return set()
        if epoch != self.epoch:
            self.boundaries.clear()
            self.epoch = epoch
        unknown = list({TopicPartition(i.record.topic, i.record.partition) for i in flagged} - self.boundaries.keys())
        if unknown:
            self.boundaries.update(await self.partition_ends(unknown))
        return {
            i.payload.customer_id
            for i in flagged
            if i.record.offset >= self.boundaries.get(TopicPartition(i.record.topic, i.record.partition), float("inf"))
        }


# The phases a batch marks (``shared.runtime.phases``), in order: the memory's lock, decoding,
# a recovery, waiting for the write in flight to release ``applying``, loading customers,
# applying the records, the coordinator's confirmation, making the outputs, the journal
# insert, handing the outputs to the producer, Kafka's acknowledgements, and the write
# behind's turn (with its backpressure).
BATCH_PHASES = (
    "lock", "read", "recover", "applying_wait", "load", "apply", "member", "outputs", "journal", "publish", "acknowledged", "finish",
)


# Where a batch's customers' state comes from: kept in memory (since stored, or with changes
# not stored yet), read from the store, or nothing to read (a customer known to be new).
LOAD_SOURCES = ("memory", "store", "new")


def count_loads(counter: Counter, customers: int, memory: int, new: int) -> None:
    for source, n in zip(LOAD_SOURCES, (memory, customers - memory - new, new), strict=True):
        if n:
            counter.labels(source).inc(n)


class ConversationConsumer:
    def __init__(
        self,
        reader: BatchReader,
        store: ConversationStore,
        outbox: Outbox,
        rules: Rules,
        tracing: RecordTracer,
        directory: DirectoryWatcher | None = None,
        latency: Histogram | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        memory: JournaledCustomers | None = None,
        partition_ends: PartitionEnds | None = None,
        phases: BatchPhases | None = None,
        loaded: Counter | None = None,
    ) -> None:
        self.phases: BatchPhases | NoPhases = phases if phases is not None else NoPhases()
        self.loaded = loaded  # customers taken per batch, by where their state came from (``LOAD_SOURCES``)
        self.memory = memory if memory is not None else JournaledCustomers(store, interval_s=1.0)
        self.memory.republish = self.republish
        self.fresh = FreshRecords(partition_ends)
        self.reader = reader
        self.store = store
        self.outbox = outbox
        self.rules = rules
        self.tracing = tracing
        self.directory = directory
        self.latency = latency
        self.clock = clock

    async def handle(self, records: Sequence[ConsumerRecord]) -> None:
        clock = self.phases.start(records)
        async with self.memory.lock:
            clock.mark("lock")
            try:
                await self._handle(records, clock)
            except BaseException:
                # The memory may hold changes no journal entry has: recover from the store
                # and the journal before the batch comes again (which publishes again what
                # the journal holds and Kafka did not acknowledge).
                self.memory.drop()
                self.outbox.abandon()
                raise

    async def _handle(self, records: Sequence[ConsumerRecord], clock: PhaseClock | NoPhases) -> None:
        if membership_lost(self.memory.consumer()):
            # Its partitions may be another member's by now: journal nothing, publish nothing.
            raise MembershipLost("group membership lost; the batch is left to the partitions' owner")
        if self.directory is not None and self.directory.current is not self.rules.directory:
            self.rules = replace(self.rules, directory=self.directory.current)  # reloaded
        # Every batch: the group coordinator must confirm this member before anything is
        # published or journaled (a member whose session lapsed in a stall learns it only
        # from its next heartbeat); asked now, the round trip overlaps the batch's work.
        member = asyncio.ensure_future(membership_confirmed(self.memory.consumer()))
        incoming = await self.reader.read(records)
        clock.mark("read")
        partition_of = {i.payload.customer_id: i.record.partition for i in incoming}
        partitions = set(partition_of.values())
        if partitions - self.memory.recovered and not await member:  # (a recovery publishes)
            raise MembershipLost("the group coordinator does not confirm this member; the batch is left to the partitions' owner")
        await self.memory.recover(partitions)
        clock.mark("recover")
        # From taking the customers until they are journaled, the write in flight makes no
        # documents (``JournaledCustomers.applying``): a change stored before its entry is in
        # would be lost with its outputs if the batch failed (the retry finds its records
        # applied). Once the entry is in, the write may store it while the outputs go out.
        async with self.memory.applying:
            clock.mark("applying_wait")
            lines, outputs, entries = await self._apply_and_journal(incoming, partition_of, member, clock)
        for item, made in outputs:
            with self.tracing.span(item.record, item.envelope.id):
                for record in made:
                    await self.outbox.send_record(record)
        clock.mark("publish")
        # If the acknowledgement fails, the recovery publishes again from the entry (the batch
        # that comes again finds its records applied).
        await self._outputs_out()
        clock.mark("acknowledged")
        # The transcript lines are stored by the next write behind, first (one insert command
        # for the batches of half an interval, off the batch's path); the read API shows them
        # meanwhile, and the entry holding them stays until they are stored. Stored before the
        # entry, a line of an attempt that failed to journal could stay at a position the
        # retry, applying another order, fills with nothing.
        self.memory.finish(entries, lines)
        if self.memory.due:  # (confirmed above, moments ago)
            self.memory.store_aged()
        await self.memory.catch_up()  # backpressure, if the store falls behind
        clock.mark("finish")
        if self.latency is not None:
            # From the channel's publish (the inbound envelope's time) to the stored update.
            now = self.clock()
            for line in lines:
                if line["direction"] == Direction.INBOUND.value:
                    self.latency.observe(max(0.0, (now - line["at"]).total_seconds()))

    async def _apply_and_journal(
        self, incoming: list[Incoming[Any]], partition_of: dict[str, int], member: asyncio.Future[bool], clock: PhaseClock | NoPhases = NoPhases()
    ) -> tuple[list[dict[str, Any]], list[tuple[Incoming[Any], list[OutputRecord]]], dict[str, int]]:
        """Apply a batch's records to its customers, and journal the customers with the outputs
        and the transcript lines; returns the lines' documents (with the group generation that
        applied them), the outputs to publish (by input) and the journal entries holding them."""
        customer_ids = [i.payload.customer_id for i in incoming]
        conversation_ids = [i.payload.conversation_id for i in incoming if hasattr(i.payload, "conversation_id")]
        cached = self.memory.take(customer_ids)
        new = await self.fresh.new_customers(incoming, self.memory.epoch) - cached.keys()
        loaded = await self.store.load(customer_ids, conversation_ids, cached, new=new)
        clock.mark("load")
        if self.loaded is not None:
            count_loads(self.loaded, len(loaded), len(cached), len(new))

        effects: list[tuple[CustomerRecords, Effects, Incoming[Any]]] = []
        lines: list[Line] = []
        openings_first = OpeningsFirst()
        known = lambda customer, conversation: conversation in loaded[customer].conversations  # noqa: E731
        for item in incoming:
            if not openings_first.hold(item, known):
                self._apply_record(loaded[item.payload.customer_id], item, effects, lines)
        for item in openings_first.held:
            self._apply_record(loaded[item.payload.customer_id], item, effects, lines)
        clock.mark("apply")
        if not await member:
            raise MembershipLost("the group coordinator does not confirm this member; the batch is left to the partitions' owner")
        clock.mark("member")
        outputs = [(item, self._outputs(records, fx, item)) for records, fx, item in effects]
        by_partition: dict[int, list[OutputRecord]] = {}
        for item, made in outputs:
            by_partition.setdefault(partition_of[item.payload.customer_id], []).extend(made)
        generation = group_generation(self.memory.consumer())
        line_docs: dict[int, list[dict[str, Any]]] = {}
        for line in lines:
            line_docs.setdefault(partition_of[line.customer_id], []).append({**line.to_doc(), "gen": generation})
        clock.mark("outputs")
        # Durable once journaled, outputs and lines included (the customers and conversations
        # are written behind).
        entries = await self.memory.append(loaded, partition_of, by_partition, line_docs)
        clock.mark("journal")
        return [d for docs in line_docs.values() for d in docs], outputs, entries

    def _apply_record(
        self,
        records: CustomerRecords,
        item: Incoming[Any],
        effects: list[tuple[CustomerRecords, Effects, Incoming[Any]]],
        lines: list[Line],
    ) -> None:
        applied_key = applied_key_of(item.record.topic, item.record.partition)
        if records.customer is not None and records.customer.applied.get(applied_key, -1) >= item.offset:
            return  # applied before a crash or rebalance: its effects are already out
        fx = Effects(item.envelope.id)
        payload = item.payload
        if lifecycle.already_applied(records, payload):
            self._mark_applied(records, applied_key, item.offset)
            return  # sent again: a provider retry, a desktop resend, a republished decision
        self._apply(records, payload, fx)
        lifecycle.remember_applied(records, payload, item.envelope.time)
        self._mark_applied(records, applied_key, item.offset)
        lines.extend(fx.lines)
        effects.append((records, fx, item))

    def _apply(self, records: CustomerRecords, payload: Any, fx: Effects) -> None:
        if isinstance(payload, CustomerMessageReceived):
            lifecycle.customer_message(records, payload, self.rules, fx)
        elif isinstance(payload, ConversationRouted):
            lifecycle.routed(records, payload, fx)
        elif isinstance(payload, TransferRefused):
            lifecycle.transfer_refused(records, payload, fx)
        elif isinstance(payload, ReplyToCustomer):
            lifecycle.agent_reply(records, payload, self.rules, fx)
        elif isinstance(payload, ResolveConversation):
            lifecycle.resolve(records, payload, fx)
        elif isinstance(payload, TransferConversation):
            lifecycle.transfer(records, payload, fx)
        elif isinstance(payload, (OptOutOfHomeTeam, OptInToHomeTeam, ReassignHomeTeam)):
            lifecycle.customer_command(records, payload, self.rules, fx)
        elif isinstance(payload, ScheduleCallback):
            lifecycle.schedule_callback(records, payload, fx)
        elif isinstance(payload, CloseInactiveConversation):
            lifecycle.close_inactive(records, payload, fx)
        elif isinstance(payload, StartCallback):
            lifecycle.start_callback(records, payload, self.rules, fx)
        else:  # pragma: no cover - the registry and this dispatch are checked together in tests
            raise TypeError(f"conversation-state cannot apply {type(payload).__name__}")

    @staticmethod
    def _mark_applied(records: CustomerRecords, key: str, offset: int) -> None:
        if records.customer is not None:
            records.customer.applied[key] = offset

    async def _outputs_out(self) -> None:
        await self.outbox.flush()
        await self.reader.flush()

    def _outputs(self, records: CustomerRecords, fx: Effects, item: Incoming[Any]) -> list[OutputRecord]:
        """The records a record's effects publish, numbered in the customer's sequence."""
        time = item.envelope.time
        customer_id = item.payload.customer_id
        made = []
        for n, event in enumerate(fx.events):
            sequence = None
            if records.customer is not None:
                records.customer.seq += 1
                sequence = records.customer.seq
            made.append(
                self.outbox.record(CONVERSATION_EVENTS.name, customer_id, event, id=fx.next_id(f"event{n}"), time=time, sequence=sequence)
            )
        for pool_id, command in fx.routing:
            made.append(self.outbox.record(ROUTING_COMMANDS.name, pool_id, command, id=command.request_id, time=time))  # type: ignore[attr-defined]
        for delivery in fx.deliveries:
            made.append(self.outbox.record(MESSAGES_OUTBOUND.name, customer_id, delivery, id=delivery.delivery_id, time=time))
        return made

    async def republish(self, records: Sequence[OutputRecord]) -> None:
        """Publish journaled outputs again (``JournaledCustomers.recover``) and wait for Kafka."""
        try:
            for record in records:
                await self.outbox.send_record(record)
            await self.outbox.flush()
        except BaseException:
            self.outbox.abandon()  # (the next batch's flush waits only for its own records)
            raise
