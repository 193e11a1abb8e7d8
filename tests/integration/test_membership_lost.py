"""A write-behind consumer whose group membership lapsed stores nothing on the way out: after
a stall longer than its session, aiokafka tells it its partitions are revoked, but another
member may own them already, and a late write of its state would land over that member's."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.runtime.checkpoints import StoreBeforeRevocation, group_generation, membership_confirmed, membership_lost
from tests.support import eventually

pytestmark = pytest.mark.integration


class Owner:
    """What ``StoreBeforeRevocation`` drives, recording what it was asked to do."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.calls: list[str] = []
        self.revoked: set[TopicPartition] = set()
        self.assigned: set[TopicPartition] = set()

    async def settle(self) -> None:
        self.calls.append("settle")

    def flush(self) -> None:
        self.calls.append("flush")

    def forget_revoked(self, revoked: set[TopicPartition]) -> None:
        self.calls.append("forget")
        self.revoked |= revoked

    def take_assigned(self, assigned: set[TopicPartition]) -> None:
        self.calls.append("assigned")
        self.assigned = set(assigned)


def consumer(infra, group: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=infra.kafka, group_id=group, session_timeout_ms=6_000, heartbeat_interval_ms=500,
        enable_auto_commit=False, auto_offset_reset="earliest",
    )  # fmt: skip


@asynccontextmanager
async def two_members(infra, topic_prefix: str) -> AsyncIterator[tuple[Owner, AIOKafkaConsumer, AIOKafkaConsumer]]:
    """A member of a fresh group, assigned the topic's partitions (``StoreBeforeRevocation``
    around an ``Owner``), and a second member of the group, not started."""
    topic = f"{topic_prefix}agent.presence.v1"
    group = f"membership-{uuid.uuid4().hex[:8]}"
    owner = Owner()
    first = consumer(infra, group)
    first.subscribe([topic], listener=StoreBeforeRevocation(owner, lambda: first))
    await first.start()
    second = consumer(infra, group)
    second.subscribe([topic])
    try:
        await eventually(lambda: asyncio.sleep(0, result=owner.assigned or None), timeout_s=30, what="first assignment")
        yield owner, first, second
    finally:
        await first.stop()
        await second.stop()


async def test_a_member_whose_session_expired_does_not_store_what_it_held(infra, topic_prefix) -> None:
    async with two_members(infra, topic_prefix) as (owner, stalled, other):
        held = set(owner.assigned)
        assert not membership_lost(stalled)
        joined_in = group_generation(stalled)
        assert joined_in >= 1

        # The process stalls: no heartbeat reaches the broker for longer than the session.
        coordinator = stalled._coordinator
        beat = coordinator._do_heartbeat
        paused = asyncio.Event()

        async def no_heartbeat() -> bool:
            if not paused.is_set():
                await asyncio.sleep(0.5)
                return True
            return await beat()

        coordinator._do_heartbeat = no_heartbeat
        await other.start()
        await eventually(lambda: asyncio.sleep(0, result=other.assignment() == held or None), timeout_s=60, what="the other member owns it all")
        assert group_generation(other) > joined_in  # the new owner's writes outrank the stalled one's

        owner.calls.clear()
        paused.set()  # the stall ends: the next heartbeat finds the member unknown
        await eventually(lambda: asyncio.sleep(0, result="forget" in owner.calls or None), timeout_s=30, what="the revocation")
        assert owner.revoked == held
        assert "flush" not in owner.calls  # nothing of the old state stored
        assert owner.calls.index("settle") < owner.calls.index("forget")  # a write under way finished first


async def test_a_rebalance_of_a_live_member_stores_first(infra, topic_prefix) -> None:
    async with two_members(infra, topic_prefix) as (owner, _, other):
        owner.calls.clear()
        await other.start()  # a rebalance: the member is told first and is still a member
        await eventually(lambda: asyncio.sleep(0, result="forget" in owner.calls or None), timeout_s=30, what="the revocation")
        assert owner.calls[:4] == ["settle", "flush", "settle", "forget"]


async def test_a_member_whose_session_expired_is_not_confirmed_before_a_store(infra, topic_prefix) -> None:
    """Asked before a store (a heartbeat sent then), the coordinator answers that the stalled
    member is gone, before the member's own heartbeat routine would have learnt it; the new
    owner is confirmed."""
    async with two_members(infra, topic_prefix) as (owner, stalled, other):
        held = set(owner.assigned)
        assert await membership_confirmed(stalled)
        coordinator = stalled._coordinator
        beat = coordinator._do_heartbeat

        async def stalled_heartbeat() -> bool:  # the routine's heartbeats never reach the broker
            await asyncio.sleep(0.5)
            return True

        coordinator._do_heartbeat = stalled_heartbeat
        await other.start()
        await eventually(lambda: asyncio.sleep(0, result=other.assignment() == held or None), timeout_s=60, what="the other member owns it all")
        assert not membership_lost(stalled)  # its own view: still a member

        coordinator._do_heartbeat = beat  # the stall ends; a store asks first
        assert not await membership_confirmed(stalled)
        assert membership_lost(stalled)
        assert await membership_confirmed(other)
