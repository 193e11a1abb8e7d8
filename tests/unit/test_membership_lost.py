"""A consumer whose group membership lapsed (aiokafka reset its generation) stores no
write-behind state: neither the checkpointed services' state nor conversation-state's
customers (the real rebalance is in tests/integration/test_membership_lost.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from shared.runtime.checkpoints import Checkpointed, MembershipLost, group_generation, membership_confirmed, membership_lost

from services.conversation_state.write_behind import JournaledCustomers
from tests.support import ManualClock


def member(generation: int | None) -> Any:
    """A consumer as ``membership_lost`` sees it (None: not started, no coordinator)."""
    return SimpleNamespace() if generation is None else SimpleNamespace(_coordinator=SimpleNamespace(generation=generation))


@pytest.mark.parametrize(
    ("consumer", "lost"),
    [
        (None, False),  # no consumer yet
        (member(None), False),  # not started
        (member(7), False),  # a member of generation 7
        (member(-1), True),  # reset: the group no longer knows it
    ],
)
def test_membership_is_lost_once_the_generation_is_reset(consumer, lost) -> None:
    assert membership_lost(consumer) is lost


def asking(generation: int, answer: str) -> Any:
    """A member of ``generation`` whose heartbeat, sent now, gets ``answer``: "ok", "rebalancing"
    (still a member: aiokafka answers True), "unreachable" (the send failed: False), "unknown"
    (the coordinator no longer knows it: aiokafka resets the generation) or "raises"."""
    coordinator = SimpleNamespace(generation=generation, sent=0)

    async def heartbeat() -> bool | None:
        coordinator.sent += 1
        if answer == "raises":
            raise RuntimeError("group authorization failed")
        if answer == "unknown":
            coordinator.generation = -1
            return None
        return answer in ("ok", "rebalancing")

    coordinator._do_heartbeat = heartbeat
    return SimpleNamespace(_coordinator=coordinator)


@pytest.mark.parametrize(
    ("consumer", "confirmed", "sent"),
    [
        (None, True, 0),  # not in a group
        (member(None), True, 0),
        (member(7), True, 0),  # a coordinator that cannot be asked: its own view
        (asking(-1, "ok"), False, 0),  # known lapsed: nothing to ask
        (asking(7, "ok"), True, 1),
        (asking(7, "rebalancing"), True, 1),
        (asking(7, "unreachable"), False, 1),
        (asking(7, "unknown"), False, 1),  # the stall outlived the session: another owns it
        (asking(7, "raises"), False, 1),
    ],
)
async def test_membership_is_confirmed_by_a_heartbeat_before_a_store(consumer, confirmed, sent) -> None:
    assert await membership_confirmed(consumer) is confirmed
    coordinator = getattr(consumer, "_coordinator", None)
    assert getattr(coordinator, "sent", 0) == sent




async def test_a_confirmation_answers_for_a_quarter_second_after_its_heartbeat_was_sent() -> None:
    consumer, clock = asking(7, "ok"), ManualClock(100.0)
    assert await membership_confirmed(consumer, clock)
    clock.now += 0.2
    assert await membership_confirmed(consumer, clock)
    assert consumer._coordinator.sent == 1
    clock.now += 0.06  # 0.26 s after the heartbeat
    assert await membership_confirmed(consumer, clock)
    assert consumer._coordinator.sent == 2


async def test_a_confirmation_answers_within_its_generation_only_and_never_once_lapsed() -> None:
    consumer, clock = asking(7, "ok"), ManualClock(100.0)
    assert await membership_confirmed(consumer, clock)
    consumer._coordinator.generation = 8  # a rebalance since
    assert await membership_confirmed(consumer, clock)
    assert consumer._coordinator.sent == 2
    consumer._coordinator.generation = -1  # lapsed
    assert not await membership_confirmed(consumer, clock)


@pytest.mark.parametrize("answer", ["unreachable", "unknown", "raises"])
async def test_a_refusal_is_not_remembered(answer: str) -> None:
    consumer, clock = asking(7, answer), ManualClock(100.0)
    assert not await membership_confirmed(consumer, clock)
    consumer._coordinator.generation = 7
    assert not await membership_confirmed(consumer, clock)
    assert consumer._coordinator.sent == 2


async def test_a_short_session_holds_a_confirmation_a_tenth_of_it() -> None:
    consumer, clock = asking(7, "ok"), ManualClock(100.0)
    consumer._coordinator._session_timeout_ms = 1_000
    assert await membership_confirmed(consumer, clock)
    clock.now += 0.15
    assert await membership_confirmed(consumer, clock)
    assert consumer._coordinator.sent == 2


@pytest.mark.parametrize(("consumer", "generation"), [(None, 0), (member(None), 0), (member(7), 7), (member(-1), -1)])
def test_writes_carry_the_generation_the_consumer_joined_in(consumer, generation) -> None:
    assert group_generation(consumer) == generation


@pytest.mark.parametrize(("generation", "captured"), [(7, True), (-1, False)])
def test_a_checkpointed_state_is_not_captured_while_membership_is_lost(generation, captured) -> None:
    snapshots: list[int] = []
    owner = Checkpointed(
        checkpoints=None,  # type: ignore[arg-type]  # (nothing to write: the capture is empty)
        snapshot_state=lambda: snapshots.append(1) or None,  # type: ignore[func-returns-value]
        drop_state=lambda: None,
        interval_s=1.0,
        consumer=lambda: member(generation),
    )
    owner.flush()
    assert bool(snapshots) is captured


async def test_conversation_state_writes_no_customer_while_membership_is_lost() -> None:
    memory = JournaledCustomers(store=None, interval_s=1.0)  # type: ignore[arg-type]  # never reached
    memory.consumer = lambda: member(-1)
    memory.dirty["cus_1"] = float("-inf")
    memory.flush()
    assert memory.writing is None and "cus_1" in memory.dirty  # still dirty: the journal holds it


async def test_a_checkpointed_batch_is_not_handled_while_membership_is_lost() -> None:
    handled: list[Any] = []
    owner = Checkpointed(
        checkpoints=None,  # type: ignore[arg-type]
        snapshot_state=lambda: None,
        drop_state=lambda: None,
        interval_s=60.0,
        consumer=lambda: member(-1),
    )

    async def handle(records: list[Any]) -> None:
        handled.extend(records)

    with pytest.raises(MembershipLost):  # the framework then nacks it: nothing committed
        await owner.run_batch([SimpleNamespace(topic="t", partition=0, offset=3)], handle)  # type: ignore[list-item]
    assert handled == []


async def test_conversation_state_handles_no_batch_while_membership_is_lost() -> None:
    """Nothing read, journaled or published: the batch fails (its offsets are not committed)."""
    from services.conversation_state.handlers import ConversationConsumer

    memory = JournaledCustomers(store=None, interval_s=1.0)  # type: ignore[arg-type]
    memory.consumer = lambda: member(-1)
    outbox = SimpleNamespace(abandon=lambda: None)  # (a failed batch forgets what it queued: nothing)
    consumer = ConversationConsumer(
        reader=None, store=None, outbox=outbox, rules=None, tracing=None, memory=memory  # type: ignore[arg-type]
    )  # (any of them touched would raise AttributeError, not MembershipLost)
    with pytest.raises(MembershipLost):
        await consumer.handle([SimpleNamespace(topic="t", partition=0, offset=3)])  # type: ignore[list-item]


class _OneRecord:
    """A reader whose batch is one record of customer ``cus_1`` on partition 0."""

    async def read(self, records: Any) -> list[Any]:
        return [SimpleNamespace(payload=SimpleNamespace(customer_id="cus_1"), record=SimpleNamespace(topic="t", partition=0))]


@pytest.mark.parametrize(("answer", "recovered"), [("ok", True), ("unreachable", False), ("unknown", False)])
async def test_conversation_state_recovers_a_partition_only_once_the_coordinator_confirms_the_member(answer, recovered) -> None:
    """A recovery publishes what the journal holds and Kafka did not acknowledge: a member
    whose session lapsed would publish the next owner's outputs, out of their order. Neither
    a batch nor the background loop recovers unless the coordinator confirms the member."""
    from services.conversation_state.handlers import ConversationConsumer

    memory = JournaledCustomers(store=None, interval_s=0.02)  # type: ignore[arg-type]
    memory.consumer = lambda consumer=asking(7, answer): consumer
    recoveries: list[set[int]] = []

    async def recover(partitions: Any) -> None:
        recoveries.append(set(partitions))
        raise RuntimeError("stop here")  # (what a batch does after recovering is not the point)

    memory.recover = recover  # type: ignore[method-assign]
    consumer = ConversationConsumer(
        reader=_OneRecord(), store=None, outbox=SimpleNamespace(abandon=lambda: None), rules=None, tracing=None, memory=memory  # type: ignore[arg-type]
    )
    with pytest.raises(RuntimeError if recovered else MembershipLost):
        await consumer.handle([SimpleNamespace(topic="t", partition=0, offset=3)])  # type: ignore[list-item]
    assert recoveries == ([{0}] if recovered else [])

    recoveries.clear()
    memory.assigned = {0}
    loop = asyncio.create_task(memory.flush_when_due())
    await asyncio.sleep(0.1)  # several turns of the loop (each half an interval)
    loop.cancel()
    assert bool(recoveries) is recovered  # (the loop goes on after a failed recovery)
    if recovered:
        assert len(recoveries) > 1 and all(p == {0} for p in recoveries)


@pytest.mark.parametrize(("answer", "stored"), [("ok", True), ("rebalancing", True), ("unreachable", False), ("unknown", False)])
async def test_a_checkpointed_batch_stores_only_once_the_coordinator_confirms_the_member(answer, stored) -> None:
    """Due to store after a batch: the heartbeat sent as the batch began must have been
    answered (a member whose session lapsed in a stall still believes it is one until then)."""
    captures: list[int] = []
    written: list[Any] = []

    async def bulk_write(ops: list[Any], ordered: bool) -> None:
        written.extend(ops)

    owner = Checkpointed(
        checkpoints=SimpleNamespace(bulk_write=bulk_write),  # type: ignore[arg-type]
        snapshot_state=lambda: captures.append(1) or None,  # type: ignore[func-returns-value]
        drop_state=lambda: None,
        interval_s=0.0,  # always due
        consumer=lambda consumer=asking(7, answer): consumer,
    )

    async def handle(records: list[Any]) -> None:
        pass

    await owner.run_batch([SimpleNamespace(topic="t", partition=0, offset=3)], handle)  # type: ignore[list-item]
    await owner.settle()
    assert (bool(captures), bool(written)) == (stored, stored)


class _Done:
    """What a conversation-state batch touches once its records are read, recorded."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def read(self, records: Any) -> list[Any]:
        return []

    async def load(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {}

    async def save_line_docs(self, lines: list[Any], generation: int = 0) -> None:
        self.calls.append("lines")

    async def flush(self) -> None:
        self.calls.append("flush")

    def abandon(self) -> None:
        pass  # (a failed batch's queued outputs: none here)


@pytest.mark.parametrize(("answer", "handled"), [("ok", True), ("rebalancing", True), ("unreachable", False), ("unknown", False)])
async def test_conversation_state_publishes_and_journals_only_once_the_coordinator_confirms_the_member(answer, handled) -> None:
    """A member whose session lapsed in a stall still believes it is one until its next
    heartbeat: each batch asks the coordinator first, and publishes, stores lines and journals
    nothing unless it confirms."""
    from services.conversation_state.handlers import ConversationConsumer

    done = _Done()
    memory = JournaledCustomers(store=None, interval_s=60.0)  # type: ignore[arg-type]
    memory.consumer = lambda consumer=asking(7, answer): consumer
    journaled: list[Any] = []
    memory.append = lambda *args: journaled.append(args) or asyncio.sleep(0, result={})  # type: ignore[method-assign]
    consumer = ConversationConsumer(
        reader=done, store=done, outbox=done, rules=None, tracing=None, memory=memory  # type: ignore[arg-type]
    )
    if handled:
        await consumer.handle([SimpleNamespace(topic="t", partition=0, offset=3)])  # type: ignore[list-item]
    else:
        with pytest.raises(MembershipLost):
            await consumer.handle([SimpleNamespace(topic="t", partition=0, offset=3)])  # type: ignore[list-item]
    assert (bool(done.calls), bool(journaled)) == (handled, handled)


@pytest.mark.parametrize(("answer", "confirmed"), [("ok", True), ("rebalancing", True), ("unreachable", False), ("unknown", False)])
async def test_a_checkpointed_batch_with_outputs_is_confirmed_before_they_go_out(answer, confirmed) -> None:
    """``confirm_outputs``: every batch asks the coordinator (not only one due to store) and
    the handler awaits the answer before publishing; unconfirmed, the state is rewound and
    ``MembershipLost`` raised (nothing committed)."""
    consumer = asking(7, answer)
    consumer.assignment = lambda: set()
    dropped: list[int] = []
    owner = Checkpointed(
        checkpoints=None,  # type: ignore[arg-type]
        snapshot_state=lambda: None,
        drop_state=lambda: dropped.append(1),
        interval_s=60.0,  # not due to store
        consumer=lambda: consumer,
    )
    published: list[Any] = []

    async def handle(records: list[Any], confirmed_now: Any) -> None:
        await confirmed_now()
        published.extend(records)

    batch = [SimpleNamespace(topic="t", partition=0, offset=3)]
    if confirmed:
        await owner.run_batch(batch, handle, confirm_outputs=True)  # type: ignore[arg-type]
    else:
        with pytest.raises(MembershipLost):
            await owner.run_batch(batch, handle, confirm_outputs=True)  # type: ignore[arg-type]
    assert consumer._coordinator.sent == 1
    assert (bool(published), bool(dropped), owner.handled) == (confirmed, not confirmed, {"t/0": 3} if confirmed else {})


class _Outputs:
    """team-routing's outbox and reader, recording what goes out."""

    def __init__(self, incoming: list[Any]) -> None:
        self.incoming = incoming
        self.sent: list[tuple[str, str]] = []

    async def read(self, records: Any) -> list[Any]:
        return self.incoming

    async def send(self, topic: str, key: str, payload: Any, **kwargs: Any) -> None:
        self.sent.append((topic, key))

    async def flush(self) -> None:
        pass


@pytest.mark.parametrize(("answer", "published"), [("ok", True), ("unreachable", False), ("unknown", False)])
async def test_team_routing_publishes_decisions_only_once_the_coordinator_confirms_the_member(answer, published) -> None:
    """A team-routing member whose session lapsed in a stall would otherwise decide and
    publish a batch the pool's new owner decides too (two agents for one conversation)."""
    from contextlib import nullcontext
    from datetime import UTC, datetime

    from services.team_routing.handlers import PoolConsumer
    from services.team_routing.pool import PoolState
    from services.team_routing.store import PlacementLog
    from shared.contracts.agents import Presence
    from shared.contracts.routing import SetAgentPresence
    from tests.unit.test_pool import DIRECTORY

    command = SetAgentPresence(request_id="p1", agent_id="ana", presence=Presence.ONLINE, changed_at=datetime(2026, 11, 16, 18, tzinfo=UTC))
    record = SimpleNamespace(topic="routing.commands.v1", partition=0, offset=3)
    io = _Outputs([SimpleNamespace(record=record, offset=3, envelope=SimpleNamespace(id="e1", subject="west"), payload=command)])

    async def load(pool_ids: Any) -> dict[str, Any]:
        return {p: (PoolState(pool_id=p), PlacementLog()) for p in pool_ids}

    pools = PoolConsumer(
        reader=io,  # type: ignore[arg-type]
        store=SimpleNamespace(load=load),  # type: ignore[arg-type]
        outbox=io,  # type: ignore[arg-type]
        directory=SimpleNamespace(current=DIRECTORY),  # type: ignore[arg-type]
        tracing=SimpleNamespace(span=lambda *a: nullcontext()),  # type: ignore[arg-type]
    )
    consumer = asking(7, answer)
    consumer.assignment = lambda: set()
    owner = Checkpointed(
        checkpoints=None,  # type: ignore[arg-type]
        snapshot_state=pools.snapshot_state,
        drop_state=pools.drop_state,
        interval_s=60.0,
        consumer=lambda: consumer,
    )
    if published:
        await owner.run_batch([record], pools.handle, confirm_outputs=True)  # type: ignore[list-item]
    else:
        with pytest.raises(MembershipLost):
            await owner.run_batch([record], pools.handle, confirm_outputs=True)  # type: ignore[list-item]
    assert bool(io.sent) is published
    assert ("west" in pools.states) is published  # applied in memory, dropped unconfirmed
