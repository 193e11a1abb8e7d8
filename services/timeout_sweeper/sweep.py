"""The sweep: claim due deadlines in bounded batches, publish one keyed command per deadline,
then remove what fired. Safe with several replicas and across restarts: a claim is a unique
document per (deadline, attempt); a deadline whose sweeper died is claimed again one lease
later; commands carry ids derived from the deadline, so a repeat is dropped by its receiver.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.runtime.logging import get_logger
from shared.runtime.outbox import Outbox
from shared.teams import DirectoryWatcher, next_change

from services.timeout_sweeper.deadlines import HOURS, claim_attempt, firing_for, hours_deadline
from services.timeout_sweeper.store import DeadlineStore

log = get_logger("hometeam.sweeper")
Clock = Callable[[], datetime]


class Sweeper:
    def __init__(
        self,
        store: DeadlineStore,
        outbox: Outbox,
        directory: DirectoryWatcher,
        clock: Clock,
        owner: str,
        registry: CollectorRegistry,
        *,
        batch_size: int = 200,
        lease: timedelta = timedelta(seconds=30),
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.directory = directory
        self.clock = clock
        self.owner = owner
        self.batch_size = batch_size
        self.lease = lease
        self.fired = Counter("hometeam_deadlines_fired_total", "Deadlines fired, by kind.", ["kind"], registry=registry)
        self.lost_claims = Counter(
            "hometeam_deadline_claims_lost_total", "Due deadlines another replica claimed first.", registry=registry
        )
        self.lateness = Histogram(
            "hometeam_deadline_lateness_seconds",
            "How long after its due time a deadline fired.",
            ["kind"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=registry,
        )
        self.overdue = Gauge("hometeam_deadlines_overdue", "Due deadlines seen but not yet fired in the last sweep.", registry=registry)

    async def arm_team_hours(self) -> None:
        """Make sure every team has its next opening/closing deadline."""
        now = self.clock()
        for team in self.directory.current.teams:
            if await self.store.count_hours(team.id) == 0:
                change = next_change(team, now)
                if change is not None:
                    await self.store.insert([hours_deadline(team.id, change)], now)

    async def sweep_once(self) -> int:
        """Fire up to one batch of due deadlines; returns how many this replica fired."""
        now = self.clock()
        due = await self.store.due(now, self.batch_size)
        self.overdue.set(len(due))
        fired: list[str] = []
        next_hours = []
        directory = self.directory.current
        attempts = {doc["_id"]: claim_attempt(doc["due_at"], now, self.lease) for doc in due}
        # A later attempt only takes over from a claim older than one lease: a replica still
        # busy with its claim (a long sweep) is not overtaken, so nothing fires twice.
        busy = await self.store.recent_claims(
            [f"{i}#{a - 1}" for i, a in attempts.items() if a > 0], now - self.lease
        )
        for doc in due:
            attempt = attempts[doc["_id"]]
            if attempt > 0 and f"{doc['_id']}#{attempt - 1}" in busy:
                continue
            if not await self.store.claim(doc["_id"], attempt, self.owner, now):
                self.lost_claims.inc()
                continue
            firing = firing_for(doc, directory)
            if firing is not None:
                await self.outbox.send(firing.topic, firing.key, firing.command, id=_command_id(firing.command), time=doc["due_at"])
            if doc["kind"] == HOURS:
                team = directory.team(doc["entity"])
                change = next_change(team, doc["due_at"]) if team else None
                if change is not None:
                    next_hours.append(hours_deadline(team.id, change))
            fired.append(doc["_id"])
            self.fired.labels(doc["kind"]).inc()
            self.lateness.labels(doc["kind"]).observe(max(0.0, (now - doc["due_at"]).total_seconds()))
        await self.outbox.flush()
        if next_hours:
            await self.store.insert(next_hours, now)
        await self.store.done(fired)
        return len(fired)

    async def run(self, interval_s: float) -> None:
        await self.arm_team_hours()
        last_cleanup = self.clock()
        while True:
            try:
                fired = await self.sweep_once()
                now = self.clock()
                if now - last_cleanup > timedelta(hours=1):
                    await self.store.forget_claims_before(now - timedelta(days=1))
                    last_cleanup = now
            except Exception:  # the loop must outlive a store or broker hiccup
                log.exception("sweep failed; retrying")
                fired = 0
            if fired < self.batch_size:
                await asyncio.sleep(interval_s)


def _command_id(command: object) -> str:
    return getattr(command, "command_id", None) or getattr(command, "request_id")  # type: ignore[no-any-return]
