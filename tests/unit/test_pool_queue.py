"""A pool's waiting queue, kept in order as placements change: the same queue, depth, oldest
wait and positions as sorting every waiting placement would give."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from services.team_routing.pool import Placement, PoolState
from shared.contracts.common import RoutingReason, WaitingOn

T = datetime(2026, 12, 4, 9, 0, tzinfo=UTC)


def placement(n: int, priority: int, minutes: int, agent: str | None = None) -> Placement:
    return Placement(
        conversation_id=f"c-{n:03d}",
        customer_id=f"cust-{n}",
        agent_id=agent,
        waiting_on=WaitingOn.AGENT,
        priority=priority,
        enqueued_at=T + timedelta(minutes=minutes),
        pool_reason=RoutingReason.HOME_TEAM,
    )


def reference(state: PoolState) -> list[Placement]:
    waiting = [p for p in state.placements.values() if p.agent_id is None]
    return sorted(waiting, key=lambda p: (-p.priority, p.enqueued_at, p.conversation_id))


@pytest.mark.parametrize(
    ("placements", "queue", "oldest_minutes"),
    [
        ([], [], None),
        ([placement(1, 0, 5)], ["c-001"], 5),
        # priority first: the oldest wait is not the head of the queue
        ([placement(1, 0, 1), placement(2, 5, 9), placement(3, 0, 3)], ["c-002", "c-001", "c-003"], 1),
        # the same time: by conversation id
        ([placement(2, 0, 4), placement(1, 0, 4)], ["c-001", "c-002"], 4),
        # assigned placements are not in the queue
        ([placement(1, 0, 0, agent="a"), placement(2, 0, 7)], ["c-002"], 7),
    ],
)
def test_queue_order_depth_and_oldest(placements: list[Placement], queue: list[str], oldest_minutes: int | None) -> None:
    state = PoolState(pool_id="pnw", placements={p.conversation_id: p for p in placements})
    assert [p.conversation_id for p in state.queue()] == queue
    assert state.queue_depth() == len(queue)
    assert state.oldest_waiting_since() == (None if oldest_minutes is None else T + timedelta(minutes=oldest_minutes))
    for n, conversation_id in enumerate(queue, start=1):
        assert state.position(conversation_id) == n


def test_the_queue_stays_in_order_through_any_changes() -> None:
    rng = random.Random(6)
    state = PoolState(pool_id="pnw")
    for step in range(3000):
        n = rng.randrange(200)
        cid = f"c-{n:03d}"
        held = state.placements.get(cid)
        action = rng.random()
        if held is None or action < 0.3:
            state.add(placement(n, rng.choice([0, 0, 0, 5]), rng.randrange(60), agent=rng.choice([None, None, "a", "b"])))
        elif action < 0.5:
            state.remove(cid)
        elif action < 0.8:
            state.assign(held, None if held.agent_id else rng.choice(["a", "b"]))
        else:
            state.set_waiting_on(held, WaitingOn.CUSTOMER if held.waiting_on is WaitingOn.AGENT else WaitingOn.AGENT)
        if step % 50 == 0 or step == 2999:
            expected = reference(state)
            assert state.queue() == expected
            assert state.queue_depth() == len(expected)
            assert state.oldest_waiting_since() == min((p.enqueued_at for p in expected), default=None)
            assert [state.position(p.conversation_id) for p in expected] == list(range(1, len(expected) + 1))
