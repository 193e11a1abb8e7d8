"""A sweep claims its due deadlines in one store command, then queues their commands
together: a command queued between two waits on the store would leave Kafka's producer in a
request of its own (with no linger: ``PRODUCER_LINGER_MS`` 0), and a claim per deadline was a
round trip each."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry

from services.timeout_sweeper.deadlines import INACTIVITY
from services.timeout_sweeper.sweep import Sweeper

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


class _Calls:
    """The store and the outbox of a sweep, recording the order of what it asks."""

    def __init__(self, docs: list[dict[str, Any]], lost: set[str] = frozenset()) -> None:
        self.docs = {d["_id"]: d for d in docs}
        self.lost = lost
        self.calls: list[str] = []
        self.armed_listeners: list[Any] = []

    async def due(self, until: datetime, limit: int) -> list[dict[str, Any]]:
        return [d for d in self.docs.values() if d["due_at"] <= until]

    async def get(self, ids: Any) -> dict[str, dict[str, Any]]:
        return {i: self.docs[i] for i in ids if i in self.docs}

    async def recent_claims(self, claim_ids: list[str], since: datetime) -> set[str]:
        return set()

    async def claim(self, attempts: dict[str, int], owner: str, now: datetime) -> set[str]:
        await asyncio.sleep(0)  # a round trip to the store: the event loop turns
        self.calls.append("claim " + ",".join(sorted(attempts)))
        return set(attempts) - self.lost

    async def done(self, ids: list[str]) -> None:
        self.calls.append("done")

    async def insert(self, arms: Any, now: datetime) -> None:
        pass

    async def send(self, topic: str, key: str, command: Any, **kwargs: Any) -> None:
        self.calls.append(f"send {command.conversation_id}")

    async def flush(self) -> None:
        self.calls.append("flush")


def _inactivity(n: int) -> dict[str, Any]:
    return {
        "_id": f"d{n}",
        "kind": INACTIVITY,
        "entity": f"c{n}",
        "due_at": NOW - timedelta(seconds=n + 1),
        "data": {"customer_id": f"cus{n}", "conversation_id": f"c{n}"},
    }


async def test_a_sweep_claims_its_due_deadlines_at_once_then_queues_their_commands_together() -> None:
    calls = _Calls([_inactivity(n) for n in range(3)], lost={"d1"})  # d1: another replica claimed it
    registry = CollectorRegistry()
    sweeper = Sweeper(calls, calls, SimpleNamespace(current=None), lambda: NOW, "me", registry)  # type: ignore[arg-type]
    assert await sweeper.sweep_once() == 2
    assert calls.calls[0] == "claim d0,d1,d2"
    assert sorted(calls.calls[1:3]) == ["send c0", "send c2"]  # not the lost claim's
    assert calls.calls[3:] == ["flush", "done"]
    assert registry.get_sample_value("hometeam_deadline_claims_lost_total") == 1


async def test_a_lost_claim_is_looked_at_again_when_its_next_attempt_may_be_claimed() -> None:
    """If the replica that claimed it dies before firing it, it fires one lease later, not at
    this sweeper's next read of the store (up to SWEEP_READ_AHEAD_MAX_S away)."""
    calls = _Calls([_inactivity(0)], lost={"d0"})
    clock = SimpleNamespace(now=NOW)
    sweeper = Sweeper(calls, calls, SimpleNamespace(current=None), lambda: clock.now, "me", CollectorRegistry(), lease=timedelta(seconds=30))  # type: ignore[arg-type]
    assert await sweeper.sweep_once() == 0
    assert sweeper.ahead.covered_until is not None and sweeper.ahead.covered_until < NOW + timedelta(seconds=29)  # past the window
    due = calls.docs["d0"]["due_at"]  # 1 s ago: attempt 0 was lost, attempt 1 opens 30 s after it fell due
    assert sweeper.ahead.take_due(due + timedelta(seconds=29), 10) == []
    assert sweeper.ahead.take_due(due + timedelta(seconds=30), 10) == ["d0"]
    calls.lost = set()  # the other replica died holding attempt 0
    sweeper.ahead.note([("d0", due + timedelta(seconds=30))], keep=True)  # (taken above)
    clock.now = due + timedelta(seconds=30)
    assert await sweeper.sweep_once() == 1
    assert calls.calls[-4:] == ["claim d0", "send c0", "flush", "done"]
