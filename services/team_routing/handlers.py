"""Team-routing's consumers.

``PoolConsumer`` applies ``routing.commands.v1`` (keyed by pool) to pool state, one batch at a
time: decode → apply each command not yet applied to the pools in memory (read from the store
the first time) → publish the decisions and hand-offs. The pools (with their applied offsets)
are stored every ``state_flush_interval_s`` and a checkpoint after them; after a restart,
a rebalance or a failed batch the consumer replays from the checkpoint
(``shared.runtime.checkpoints``), repeating outputs only with the same ids.
``PresenceForwarder`` re-keys agent presence from agent id to the agent's pool.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from aiokafka import ConsumerRecord
from prometheus_client import Histogram

from shared.contracts.agents import AgentPresenceChanged
from shared.contracts.envelope import derived_id
from shared.contracts.registry import POOL_STATUS, ROUTING_COMMANDS, ROUTING_DECISIONS
from shared.contracts.routing import RouteConversation, SetAgentPresence
from shared.runtime.dead_letter import PoisonMessage
from shared.runtime.decoding import BatchReader
from shared.runtime.outbox import Outbox
from shared.runtime.tracing import RecordTracer
from shared.teams import DirectoryWatcher

from services.team_routing.pool import Decision, Handoff, Output, PoolState, apply_command, command_time, status_of
from services.team_routing.store import PlacementLog, PoolStore, capture


class PoolConsumer:
    def __init__(
        self,
        reader: BatchReader,
        store: PoolStore,
        outbox: Outbox,
        directory: DirectoryWatcher,
        tracing: RecordTracer,
        latency: Histogram | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.states: dict[str, PoolState] = {}  # the pools this consumer owns, in memory
        self.dirty: set[str] = set()  # changed since last stored
        self.logs: dict[str, PlacementLog] = {}  # what of each pool's placements is stored
        self.reader = reader
        self.store = store
        self.outbox = outbox
        self.directory = directory
        self.tracing = tracing
        self.latency = latency
        self.clock = clock

    def snapshot_state(self) -> Callable[[], Awaitable[None]] | None:
        """The changed pools as documents now (under the batch lock), and how to store them."""
        ids = [p for p in self.dirty if p in self.states]
        self.dirty.clear()
        if not ids:
            return None
        logs = {p: self.logs.get(p, PlacementLog()) for p in ids}
        writes = {p: capture(self.states[p], logs[p]) for p in ids}

        async def write() -> None:
            try:
                await self.store.save(writes.values())
            except BaseException:
                self.dirty.update(ids)  # stored next time, with whatever they hold by then
                for p in ids:
                    self.logs[p] = logs[p].failed()
                raise
            for p, w in writes.items():
                self.logs[p] = w.after

        return write

    def drop_state(self) -> None:
        self.states.clear()
        self.dirty.clear()
        self.logs.clear()

    async def handle(self, records: Sequence[ConsumerRecord], confirmed: Callable[[], Awaitable[None]] | None = None) -> None:
        """One batch; call under the checkpoint lock (``Checkpointed.run_batch``), which
        passes ``confirmed``: awaited before any output goes out (it raises
        ``MembershipLost`` unless the group coordinator confirmed this member as the batch
        began; the state in memory is rewound then)."""
        incoming = await self.reader.read(records)
        pool_ids = list(dict.fromkeys(i.envelope.subject for i in incoming))
        missing = [p for p in pool_ids if p not in self.states]
        if missing:
            for pool_id, (state, log) in (await self.store.load(missing)).items():
                self.states[pool_id] = state
                self.logs[pool_id] = log
        states = self.states
        directory = self.directory.current
        published: list[tuple[Any, list[Output]]] = []
        touched: dict[str, tuple[str, datetime]] = {}
        for item in incoming:
            state = states[item.envelope.subject]
            applied_key = f"{item.record.topic}/{item.record.partition}"
            if state.applied.get(applied_key, -1) >= item.offset:
                continue
            try:
                outputs = apply_command(state, item.payload, directory, record_key(item))
            except PoisonMessage as exc:
                await self.reader.reject(item.record, exc)
                continue
            state.applied[applied_key] = item.offset
            self.dirty.add(state.pool_id)
            published.append((item, outputs))
            touched[state.pool_id] = (item.envelope.id, command_time(item.payload))

        if confirmed is not None and touched:
            await confirmed()
        for item, outputs in published:
            with self.tracing.span(item.record, item.envelope.id):
                for n, output in enumerate(outputs):
                    event_id = derived_id(record_key(item), "out", str(n))
                    if isinstance(output, Decision):
                        await self.outbox.send(
                            ROUTING_DECISIONS.name, output.customer_id, output.payload, id=event_id, time=output.payload.decided_at
                        )
                    elif isinstance(output, Handoff):
                        await self.outbox.send(
                            ROUTING_COMMANDS.name, output.pool_id, output.payload, id=event_id, time=command_time(output.payload)
                        )
        for pool_id, (last_input, at) in touched.items():
            status = status_of(states[pool_id], directory, at)
            await self.outbox.send(POOL_STATUS.name, pool_id, status, id=derived_id(last_input, "status"), time=at)
        await self.outbox.flush()
        await self.reader.flush()
        if self.latency is not None:
            # From the customer's message (its publish time, carried as requested_at) to the
            # decision being out (acknowledged by Kafka).
            now = self.clock()
            for item in incoming:
                if isinstance(item.payload, RouteConversation) and item.payload.forced_pool is None:
                    self.latency.observe(max(0.0, (now - item.payload.requested_at).total_seconds()))


def record_key(item: Any) -> str:
    """What output ids derive from: the record itself (envelope id and position). A replay of
    the same record decides again with the same ids, which receivers drop; a request sent
    again as a new record (a producer's retry after a crash) is a new decision with new ids,
    so it is never mistaken for a repeat of an earlier one."""
    record = item.record
    return f"{item.envelope.id}@{record.topic}/{record.partition}/{record.offset}"


class PresenceForwarder:
    def __init__(self, reader: BatchReader, outbox: Outbox, directory: DirectoryWatcher, tracing: RecordTracer) -> None:
        self.reader = reader
        self.outbox = outbox
        self.directory = directory
        self.tracing = tracing

    async def handle(self, records: Sequence[ConsumerRecord]) -> None:
        for item in await self.reader.read(records):
            change: AgentPresenceChanged = item.payload
            pool_id = self.directory.current.pool_of_agent(change.agent_id)
            if pool_id is None:
                await self.reader.reject(item.record, PoisonMessage("unknown_agent", "agent is in no pool of the directory"))
                continue
            command = SetAgentPresence(
                request_id=derived_id(item.envelope.id, "presence"),
                agent_id=change.agent_id,
                presence=change.presence,
                changed_at=change.changed_at,
            )
            with self.tracing.span(item.record, item.envelope.id):
                await self.outbox.send(ROUTING_COMMANDS.name, pool_id, command, id=command.request_id, time=change.changed_at)
        await self.outbox.flush()
        await self.reader.flush()
