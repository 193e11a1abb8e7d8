"""Write-behind state with checkpoints: a consumer that keeps its single-writer state in
memory, stores it every so often instead of after every batch, and after a restart or a
rebalance replays its input from the last checkpoint.

A checkpoint (``<collection>``, ``_id`` = ``<topic>/<partition>``, ``offset``) says: every
record of that partition up to ``offset`` is reflected in the stored state. It is written
only after the state it covers. When the consumer gets partitions it resumes each one at its
checkpoint + 1 (or at the beginning when there is none), whatever offsets the group
committed, so records handled in memory but not yet stored are handled again. Replaying is
safe because handling is deterministic and idempotent downstream: outputs derive their ids
from the input record's position, so a replayed record repeats its outputs with the same ids
(which receivers drop), and the stored state's applied offsets skip what it already holds.

The same rewind happens when a batch fails: the in-memory state may hold effects of earlier
batches that were never stored, so the only safe restart point is the checkpoint.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.protocol.commit import OffsetCommitRequest
from prometheus_client import CollectorRegistry, Counter, Gauge
from pymongo import ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection

from shared.runtime.store import bulk_write_chunked, find_by_ids

log = logging.getLogger(__name__)


def partition_key(topic: str, partition: int) -> str:
    return f"{topic}/{partition}"


class MembershipLost(RuntimeError):
    """A batch reached a consumer whose group membership has lapsed (``membership_lost``)."""


def membership_lost(consumer: AIOKafkaConsumer | None) -> bool:
    """Whether the consumer's group membership has lapsed: its session expired (the process
    stalled longer than the session timeout, or lost the broker meanwhile) or the group no
    longer knows its generation. The partitions it still holds may then be another member's
    already, so it must not store their state: the other member replays or recovers it, and a
    late write would land over that member's. aiokafka (0.14) has no ``on_partitions_lost``:
    it resets the generation and then rejoins, calling ``on_partitions_revoked`` on the way."""
    coordinator = getattr(consumer, "_coordinator", None)
    return coordinator is not None and coordinator.generation == OffsetCommitRequest.DEFAULT_GENERATION_ID


# How long a confirmation holds, from when its heartbeat was sent: a quarter of a second, and at
# most a tenth of the session timeout. Measured on CLOCK_BOOTTIME, which counts the time a
# suspended machine slept (the broker's session clock went on meanwhile).
CONFIRMATION_HOLDS_S = 0.25


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


async def membership_confirmed(consumer: AIOKafkaConsumer | None, clock: Callable[[], float] = _boottime) -> bool:
    """Whether the group coordinator confirms, now, that this consumer is a member of the
    generation it holds its partitions in: a heartbeat, answered. ``membership_lost`` learns
    of a lapse only from the next heartbeat of the consumer's own routine (up to its interval
    after a stall ends); a write-behind store asks first. A confirmed member keeps its
    partitions for at least a session timeout from when the coordinator got the heartbeat (no
    other member is assigned them before its session expires, and a rebalance revokes them
    from it first, or waits its rebalance timeout), so a write started at once lands while
    they are its own; and a confirmation answers for ``CONFIRMATION_HOLDS_S`` after its
    heartbeat was sent, in the same generation (conversation-state asks for every batch: at
    20 batches a second, one heartbeat in five). False if the coordinator cannot be reached
    (the write waits for the next flush; the journal or the checkpoints keep the state).
    True for a consumer that is not in a group (no coordinator)."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None:
        return True
    heartbeat = getattr(coordinator, "_do_heartbeat", None)
    if membership_lost(consumer) or heartbeat is None:
        return not membership_lost(consumer)
    generation = coordinator.generation
    session_s = (getattr(coordinator, "_session_timeout_ms", None) or 10_000) / 1000
    held = getattr(coordinator, "_hometeam_confirmed", None)  # (heartbeat sent at, generation)
    sent = clock()
    if held is not None and held[1] == generation and sent - held[0] < min(CONFIRMATION_HOLDS_S, session_s / 10):
        return True
    try:
        answered = await heartbeat()
    except Exception:  # (an authorisation failure: not a member either)
        log.warning("could not confirm the group membership before storing", exc_info=True)
        return False
    confirmed = bool(answered) and not membership_lost(consumer)
    if confirmed and coordinator.generation == generation and (held is None or held[0] < sent):
        coordinator._hometeam_confirmed = (sent, generation)
    return confirmed


def confirming(consumer: AIOKafkaConsumer | None, due: bool) -> asyncio.Future[bool] | None:
    """``membership_confirmed``, started now as a task if a store is ``due`` (None if not):
    a batch starts it before its work and awaits it before storing, so the heartbeat's round
    trip overlaps the batch instead of delaying it."""
    return asyncio.ensure_future(membership_confirmed(consumer)) if due else None


async def _confirmed(member: asyncio.Future[bool] | None) -> None:
    if member is not None and not await member:
        raise MembershipLost("the group coordinator does not confirm this member; the batch is left to the partitions' owner")


def group_generation(consumer: AIOKafkaConsumer | None) -> int:
    """The consumer group's generation this consumer joined in (0 without a consumer, -1 once
    its membership lapsed): it grows with every rebalance, so a write that carries it can tell
    a later owner's document (a higher generation) from its own or an earlier one's."""
    coordinator = getattr(consumer, "_coordinator", None)
    return int(coordinator.generation) if coordinator is not None else 0


class CheckpointMetrics:
    """How far a write-behind state is from the store (for the StateNotStored alert). Several
    states of one service share the metric families, labelled by ``state``."""

    _families: weakref.WeakKeyDictionary[CollectorRegistry, tuple[Gauge, Gauge, Counter, Counter, Counter]] = weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry, state: str, backpressure: bool = False) -> None:
        families = self._families.get(registry)
        if families is None:
            families = (
                Gauge(
                    "hometeam_state_unstored_records",
                    "Records handled in memory that no stored checkpoint covers yet (what a crash now would replay).",
                    ["state"],
                    registry=registry,
                ),
                Gauge(
                    "hometeam_state_stored_timestamp_seconds",
                    "When the state was last stored with its checkpoints, or found to have nothing to store (Unix time).",
                    ["state"],
                    registry=registry,
                ),
                Counter("hometeam_state_store_failures_total", "Failed attempts to store the state or its checkpoints.", ["state"], registry=registry),
                Counter(
                    "hometeam_state_rewinds_total",
                    "Times the in-memory state was dropped to replay from the checkpoints (rebalance, failed batch).",
                    ["state"],
                    registry=registry,
                ),
                Counter(
                    "hometeam_state_backpressure_seconds_total",
                    "Seconds the consumer waited for its state to be stored before taking more input (too much unstored: the store is slower than the input).",
                    ["state"],
                    registry=registry,
                ),
            )
            self._families[registry] = families
        unstored, stored_at, failures, rewinds, backpressure_family = families
        self.unstored = unstored.labels(state)
        self.stored_at = stored_at.labels(state)
        self.failures = failures.labels(state)
        self.rewinds = rewinds.labels(state)
        # Only a state whose consumer waits for its store has the series (the others' would
        # read 0 forever).
        self.backpressure = backpressure_family.labels(state) if backpressure else None
        self.stored_at.set_to_current_time()


class Checkpointed:
    """The bookkeeping around a write-behind consumer's state.

    ``snapshot_state`` captures what the consumer keeps dirty (and forgets it is dirty) and
    returns the coroutine function that stores that capture, or None; ``drop_state`` forgets
    everything. Batches run under ``lock``, and so does every capture, so a capture never sees
    a half-handled batch (whose outputs are not out yet). The capture is written outside the
    lock, so batches go on meanwhile: one write at a time, the state before its checkpoint;
    a failed write marks its capture dirty again (``restore``) and moves no checkpoint.
    """

    def __init__(
        self,
        checkpoints: AsyncCollection,
        snapshot_state: Callable[[], Callable[[], Awaitable[None]] | None],
        drop_state: Callable[[], None],
        interval_s: float,
        consumer: Callable[[], AIOKafkaConsumer | None],
        clock: Callable[[], float] = time.monotonic,
        metrics: CheckpointMetrics | None = None,
    ) -> None:
        self.checkpoints = checkpoints
        self.metrics = metrics
        self.snapshot_state = snapshot_state
        self.writing: asyncio.Task[None] | None = None
        self.drop_state = drop_state
        self.interval_s = interval_s
        self.consumer = consumer
        self.clock = clock
        self.lock = asyncio.Lock()
        self.handled: dict[str, int] = {}  # partition → last offset handled in memory
        self.stored: dict[str, int] = {}  # partition → last checkpoint written
        self.first: dict[str, int] = {}  # partition → first offset handled since the last rewind
        self.unverified: set[TopicPartition] = set()  # must resume at the checkpoint first
        self.last_flush = clock()

    def note(self, records: Iterable[ConsumerRecord]) -> None:
        for r in records:
            key = partition_key(r.topic, r.partition)
            if r.offset > self.handled.get(key, -1):
                self.handled[key] = r.offset
            self.first.setdefault(key, r.offset)
        self._report()

    def unstored(self) -> int:
        """Records handled in memory that no stored checkpoint covers."""
        return sum(max(0, last - self.stored.get(key, self.first.get(key, last + 1) - 1)) for key, last in self.handled.items())

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.unstored.set(self.unstored())

    @property
    def due(self) -> bool:
        return self.clock() - self.last_flush >= self.interval_s

    def flush(self) -> None:
        """Capture the state and the checkpoints it covers, and start storing them (unless
        the previous capture is still being stored: then at the next chance). Call with
        ``lock`` held."""
        if self.writing is not None and not self.writing.done():
            return
        if membership_lost(self.consumer()):
            return  # the partitions may be another member's by now (the rebalance drops the state)
        write = self.snapshot_state()
        marks = {k: v for k, v in self.handled.items() if self.stored.get(k) != v}
        self.last_flush = self.clock()
        if write is not None or marks:
            self.writing = asyncio.create_task(self._store(write, marks))
        elif self.metrics is not None:
            self.metrics.stored_at.set_to_current_time()  # nothing to store: the store is current

    async def _store(self, write: Callable[[], Awaitable[None]] | None, marks: dict[str, int]) -> None:
        try:
            if write is not None:
                await write()
            if marks:
                await bulk_write_chunked(
                    self.checkpoints, [ReplaceOne({"_id": k}, {"offset": v}, upsert=True) for k, v in marks.items()]
                )
                self.stored.update(marks)
        except Exception:  # the capture's entities are dirty again (restore); no checkpoint moved
            log.exception("storing state failed; retrying")
            if self.metrics is not None:
                self.metrics.failures.inc()
            return
        if self.metrics is not None:
            self.metrics.stored_at.set_to_current_time()
            self._report()

    async def settle(self) -> None:
        """Wait for the write in flight, if any."""
        if self.writing is not None:
            await asyncio.gather(self.writing, return_exceptions=True)

    async def flush_when_due(self) -> None:
        """For a background task: start replays that wait for no record, and store what idle
        time left unstored."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.resume_unverified()
            except Exception:  # this loop must outlive any one failure
                log.exception("resuming at the checkpoints failed; retrying")
            if self.due and await membership_confirmed(self.consumer()):  # (asked before waiting for the lock)
                async with self.lock:
                    try:
                        self.flush()
                    except Exception:  # this loop must outlive any one capture
                        log.exception("capturing state failed; retrying")

    async def resume_unverified(self) -> None:
        """Seek every assigned partition not yet verified to its checkpoint + 1 now, without
        waiting for a record of it: a partition whose group offset is already at the end of
        its log gets no record until new input arrives, and its replay (the state handled in
        memory by the consumer that died) would wait until then. The records that follow are
        still checked in ``run_batch`` (a fetch already under way may deliver the old
        position's records first: they are dropped and sought again)."""
        consumer = self.consumer()
        if consumer is None or not self.unverified:
            return
        async with self.lock:
            assigned = consumer.assignment()
            partitions = [tp for tp in self.unverified if tp in assigned]
            if not partitions:
                return
            starts = await self._starts(partitions)
            for tp in partitions:
                position = await consumer.position(tp)
                if position != starts[tp]:
                    log.info("%s/%s: resuming at offset %s (after the checkpoint), not %s", tp.topic, tp.partition, starts[tp], position)
                    consumer.seek(tp, starts[tp])

    def rewind(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop the in-memory state; the next batch from ``partitions`` starts at their
        checkpoints (``run_batch`` checks where each partition's records start, and seeks)."""
        self.drop_state()
        self.handled.clear()
        self.stored.clear()
        self.first.clear()
        self.unverified.update(partitions)
        if self.metrics is not None:
            self.metrics.rewinds.inc()
            self._report()

    async def _starts(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Where each partition must resume: its checkpoint + 1, or the log's beginning."""
        consumer = self.consumer()
        assert consumer is not None
        marks = await find_by_ids(self.checkpoints, (partition_key(tp.topic, tp.partition) for tp in partitions))
        beginnings = await consumer.beginning_offsets(partitions)
        starts = {}
        for tp in partitions:
            mark = marks.get(partition_key(tp.topic, tp.partition))
            # Records below the log's beginning are gone (retention): the stored state is all.
            starts[tp] = max(beginnings[tp], mark["offset"] + 1 if mark else 0)
            if mark:
                self.stored[partition_key(tp.topic, tp.partition)] = mark["offset"]
        return starts

    async def _resume_at_checkpoints(self, records: list[ConsumerRecord]) -> list[ConsumerRecord]:
        """The records of ``records`` that may be handled now. A partition not verified since
        an assignment or a rewind is handled only if its records start exactly at its
        checkpoint; otherwise the consumer seeks there and the partition's records of this
        batch are dropped (they come again). Checking the records themselves, rather than
        seeking inside the rebalance callback, cannot lose a race with the fetcher."""
        firsts: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            if tp in self.unverified and tp not in firsts:
                firsts[tp] = r.offset
        if not firsts:
            return records
        consumer = self.consumer()
        if consumer is None:
            return []
        starts = await self._starts(list(firsts))
        wrong = set()
        for tp, first in firsts.items():
            if first == starts[tp]:
                self.unverified.discard(tp)
            else:
                log.info("%s/%s: resuming at offset %s (after the checkpoint), not %s", tp.topic, tp.partition, starts[tp], first)
                consumer.seek(tp, starts[tp])
                wrong.add(tp)
        return [r for r in records if TopicPartition(r.topic, r.partition) not in wrong]

    async def run_batch(
        self,
        records: Sequence[ConsumerRecord],
        handle: Callable[..., Awaitable[Any]],
        *,
        confirm_outputs: bool = False,
    ) -> None:
        """Handle one batch under the lock; store when due. A failure rewinds every assigned
        partition to its checkpoint (and is logged, not raised: the framework's own retry
        would seek to the failed batch's start, skipping the unstored batches before it). A
        batch reaching a consumer whose membership lapsed raises ``MembershipLost``: the
        framework's seek is harmless then, the rebalance that follows resumes every partition
        at its checkpoint.

        ``confirm_outputs``: the handler publishes, so the group coordinator is asked as every
        batch begins (not only one due to store), and ``handle`` gets a second argument, an
        async function to await before its outputs go out: it raises ``MembershipLost``
        unless the coordinator confirmed this member (a member whose session lapsed in a
        stall learns it only from its next heartbeat otherwise, and would publish what the
        partitions' new owner publishes too). The state is rewound then, and the error
        raised (nothing committed)."""
        async with self.lock:
            if membership_lost(self.consumer()):
                # Its partitions may be another member's by now: handle nothing, commit nothing
                # (the rebalance that follows drops the state).
                raise MembershipLost("group membership lost; the batch is left to the partitions' owner")
            due = self.due
            member = confirming(self.consumer(), due or confirm_outputs)
            try:
                ready = await self._resume_at_checkpoints(list(records))
                if ready:
                    if confirm_outputs:
                        await handle(ready, functools.partial(_confirmed, member))
                    else:
                        await handle(ready)
                    self.note(ready)
                if due and member is not None and await member:
                    self.flush()
            except MembershipLost:
                log.warning("the group coordinator does not confirm this member: the batch's outputs are left to the partitions' owner")
                consumer = self.consumer()
                self.rewind(consumer.assignment() if consumer is not None else ())
                raise
            except Exception:
                log.exception("batch failed; replaying from the last checkpoint")
                consumer = self.consumer()
                self.rewind(consumer.assignment() if consumer is not None else ())
                await asyncio.sleep(1.0)  # do not spin on a store that is down

    def rebalance_listener(self) -> ConsumerRebalanceListener:
        return StoreBeforeRevocation(self, self.consumer)

    def forget_revoked(self, revoked: set[TopicPartition]) -> None:
        self.rewind(())
        self.unverified.difference_update(revoked)

    def take_assigned(self, assigned: set[TopicPartition]) -> None:
        self.rewind(assigned)


class WriteBehindOwner(Protocol):
    """A write-behind consumer's bookkeeping, as its rebalance listener sees it."""

    lock: asyncio.Lock

    async def settle(self) -> None: ...

    def flush(self) -> None: ...

    def forget_revoked(self, revoked: set[TopicPartition]) -> None: ...

    def take_assigned(self, assigned: set[TopicPartition]) -> None: ...


class StoreBeforeRevocation(ConsumerRebalanceListener):  # type: ignore[misc]
    """Rebalances of a write-behind consumer: before giving partitions up, store what can be
    stored (the next owner then recovers less), then forget the memory; on assignment, start
    from what is stored. Both under the owner's batch lock. A consumer whose membership lapsed
    (``membership_lost``) stores nothing: its partitions may have another owner already."""

    def __init__(self, owner: WriteBehindOwner, consumer: Callable[[], AIOKafkaConsumer | None] = lambda: None) -> None:
        self.owner = owner
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self.owner.lock:
            if revoked and membership_lost(self.consumer()):
                log.warning(
                    "group membership lost (session expired?): not storing the state of %s partitions; their next owner "
                    "replays or recovers it",
                    len(revoked),
                )
                await self.owner.settle()  # a write under way when the stall ended finishes
            elif revoked:
                # Nothing of ours may land after the next owner's writes: finish, then store
                # the rest now (what fails is recovered by the next owner).
                await self.owner.settle()
                self.owner.flush()
                await self.owner.settle()
            self.owner.forget_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        async with self.owner.lock:
            self.owner.take_assigned(assigned)


class WriteBehindState(Protocol):
    def snapshot_state(self) -> Callable[[], Awaitable[None]] | None: ...

    def drop_state(self) -> None: ...


def checkpointed_subscriber(
    runtime: Any, checkpoints: AsyncCollection, state_name: str, state: WriteBehindState, interval_s: float, *topics: str, **options: Any
) -> tuple[Checkpointed, Any]:
    """A service's write-behind consumer of ``topics``: its ``Checkpointed`` (metrics labelled
    ``state_name``, the background loop that flushes and resumes registered with the service)
    and the broker subscriber whose rebalances rewind it. Handlers call ``run_batch``."""
    subscriber: Any = None
    owner = Checkpointed(
        checkpoints,
        snapshot_state=state.snapshot_state,
        drop_state=state.drop_state,
        interval_s=interval_s,
        consumer=lambda: subscriber.consumer if subscriber is not None else None,
        metrics=CheckpointMetrics(runtime.registry, state_name),
    )
    runtime.background.append(owner.flush_when_due)
    subscriber = runtime.broker.subscriber(*topics, listener=owner.rebalance_listener(), **options)
    return owner, subscriber
