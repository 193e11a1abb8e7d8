"""The sweep: claim due deadlines in bounded batches, publish one keyed command per deadline,
then remove what fired. Safe with several replicas and across restarts: a claim is a unique
document per (deadline, attempt); a deadline whose sweeper died is claimed again one lease
later; commands carry ids derived from the deadline, so a repeat is dropped by its receiver.

Finding what is due is a range query on ``due_at`` that a store may answer by scanning every
deadline (FerretDB does: ~33 µs of its CPU per stored deadline, 1.5-2 s per query with the
~50,000 deadlines of a benchmark run), so the sweep does not ask it every tick. It reads
ahead: each read loads the deadlines due within the next ``read_ahead`` into memory
(``ReadAhead``), the next read comes when that window has passed, and every tick re-reads by
``_id`` only the ones now due (a deadline may have been fired or superseded since). The
window is at least ``read_ahead`` and grows with what the last read took (``read_ahead_for``:
one read per window, each taking about ``READ_SHARE`` of it; the wall time of the read, so a
busy process reads less often too), up to ``read_ahead_max``; a quick store keeps it at
``read_ahead``. Reads come more often than that when one stops at ``read_limit``, and after
every rebalance of the sweeper's consumer (a replica that left may have armed deadlines only
it had in memory) and every failed sweep. Deadlines this process arms are added as it stores
them, so they fire on time, and one whose claim another replica took is looked at again when
its next attempt may be claimed. So one armed by another replica fires late only while that
replica is gone and the group has not rebalanced yet, or by up to the window while that
replica's sweeps fail.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.runtime.logging import get_logger
from shared.runtime.outbox import Outbox
from shared.teams import DirectoryWatcher, next_change

from services.timeout_sweeper.deadlines import HOURS, Firing, claim_attempt, firing_for, hours_deadline
from services.timeout_sweeper.store import DeadlineStore

log = get_logger("hometeam.sweeper")
Clock = Callable[[], datetime]


# The share of the time a sweeper aims to spend reading what falls due (``read_ahead_for``).
READ_SHARE = 0.02


def read_ahead_for(read_s: float, shortest: timedelta, longest: timedelta, share: float = READ_SHARE) -> timedelta:
    """How far ahead the next read looks, given that the last one took ``read_s`` seconds: far
    enough that reads take at most ``share`` of the time (a read per window), within
    [``shortest``, ``longest``]."""
    return min(longest, max(shortest, timedelta(seconds=read_s / share)))


class ReadAhead:
    """The deadlines known to be due before ``covered_until``, earliest first.

    ``covered_until`` is None until the first read, and again after ``forget``: then the next
    sweep must read (also after ``request_read``). Otherwise every stored deadline due before
    it was either read or noted when this process armed it; one armed elsewhere since the read
    is the exception the module docstring describes.

    ``horizon`` is how far the next read looks ahead: ``shortest`` at first, then set by each
    read's duration (``read_ahead_for``, up to ``longest``).
    """

    def __init__(
        self, horizon: timedelta, monotonic: Callable[[], float] = time.monotonic, longest: timedelta | None = None
    ) -> None:
        self.shortest = horizon
        self.longest = max(horizon, longest or horizon)
        self.horizon = horizon
        self.monotonic = monotonic
        self.requested = False  # read at the next sweep whatever the window (``request_read``)
        self.covered_s = horizon.total_seconds()  # the window of the last read, in seconds
        self.covered_until: datetime | None = None
        self.next_read_at: datetime | None = None
        self.read_monotonic = 0.0
        self.heap: list[tuple[datetime, str]] = []
        self.queued: dict[str, datetime] = {}
        self.reading: list[tuple[str, datetime]] | None = None  # noted while a read is in flight

    def begin_read(self) -> None:
        """A read starts: what is noted until ``loaded`` is kept whatever its due time (the
        read may have passed it already, and the window moves when the read lands)."""
        self.reading = []
        self.requested = False

    def request_read(self) -> None:
        """The next sweep reads, even inside the window (a request during a read that is under
        way asks for another: that read may have passed what the request is about)."""
        self.requested = True

    def must_read(self, now: datetime) -> bool:
        """Read again: never read, asked to, the read window has passed (by the service's
        clock), or as much real time went by as the last read looked ahead (a test clock may
        stand still)."""
        return (
            self.requested
            or self.next_read_at is None
            or now >= self.next_read_at
            or self.monotonic() - self.read_monotonic >= self.covered_s
        )

    def window(self, now: datetime) -> datetime:
        return now + self.horizon

    def loaded(self, now: datetime, docs: list[dict[str, Any]], complete: bool, read_s: float = 0.0) -> None:
        """``docs``: what the store holds due up to ``window(now)``, earliest first; ``complete``
        is False when the read stopped at its limit (then only up to the last one is known);
        ``read_s``: how long the read took (sets how far the next one looks ahead)."""
        until = self.window(now) if complete or not docs else docs[-1]["due_at"]
        self.covered_until = until
        self.next_read_at = until if complete else min(until, now + self.horizon)
        self.read_monotonic = self.monotonic()
        self.covered_s = self.horizon.total_seconds()
        self.horizon = read_ahead_for(read_s, self.shortest, self.longest)
        noted_meanwhile, self.reading = self.reading or [], None
        self.note((d["_id"], d["due_at"]) for d in docs)
        self.note(noted_meanwhile)

    def has_due(self, now: datetime, count: int) -> bool:
        """At least ``count`` queued deadlines are due (cheap upper bound: heap entries)."""
        return len(self.heap) >= count and sum(1 for due_at, _ in self.heap if due_at <= now) >= count

    def note(self, deadlines: Iterable[tuple[str, datetime]], keep: bool = False) -> None:
        """Deadlines stored or seen: those inside the covered window join the queue (all of
        them with ``keep``: stored ones to look at again then, whatever the window)."""
        deadlines = [(i, _millis(due_at)) for i, due_at in deadlines]
        if self.reading is not None:
            self.reading.extend(deadlines)
        if self.covered_until is None:
            return
        for deadline_id, due_at in deadlines:
            if (keep or due_at <= self.covered_until) and self.queued.get(deadline_id) != due_at:
                self.queued[deadline_id] = due_at
                heapq.heappush(self.heap, (due_at, deadline_id))

    def take_due(self, now: datetime, limit: int) -> list[str]:
        """Up to ``limit`` queued deadlines due by ``now``, earliest first (they leave the queue)."""
        taken: list[str] = []
        while self.heap and len(taken) < limit and self.heap[0][0] <= now:
            due_at, deadline_id = heapq.heappop(self.heap)
            if self.queued.get(deadline_id) == due_at:  # else a stale duplicate entry
                del self.queued[deadline_id]
                taken.append(deadline_id)
        return taken

    def forget(self) -> None:
        self.covered_until = self.next_read_at = None
        self.reading = None
        self.heap.clear()
        self.queued.clear()


def _millis(value: datetime) -> datetime:
    """The store keeps milliseconds: a deadline noted when armed and read back compare equal."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


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
        read_ahead: timedelta = timedelta(seconds=10),
        read_ahead_max: timedelta | None = None,
        read_limit: int = 5_000,
    ) -> None:
        self.store = store
        self.ahead = ReadAhead(read_ahead, longest=read_ahead_max)
        self.read_limit = read_limit
        store.armed_listeners.append(self.ahead.note)
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
        self.read_ahead = Gauge(
            "hometeam_deadline_read_ahead_seconds",
            "How far ahead the sweep's next read of due deadlines looks (SWEEP_READ_AHEAD_S up to SWEEP_READ_AHEAD_MAX_S).",
            registry=registry,
        )
        self.read_ahead.set(read_ahead.total_seconds())

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
        try:
            return await self._sweep(self.clock())
        except BaseException:
            self.ahead.forget()  # what was taken but not fired is read again next time
            raise

    async def _due(self, now: datetime) -> list[dict[str, Any]]:
        # While a backlog larger than one read drains, what is queued fires first anyway.
        if self.ahead.must_read(now) and not self.ahead.has_due(now, self.batch_size):
            self.ahead.begin_read()
            started = self.ahead.monotonic()
            docs = await self.store.due(self.ahead.window(now), self.read_limit)
            self.ahead.loaded(now, docs, complete=len(docs) < self.read_limit, read_s=self.ahead.monotonic() - started)
            self.read_ahead.set(self.ahead.horizon.total_seconds())
        ids = self.ahead.take_due(now, self.batch_size)
        current = await self.store.get(ids)
        due = []
        for deadline_id in ids:
            doc = current.get(deadline_id)
            if doc is None:
                continue  # fired or superseded meanwhile
            if doc["due_at"] > now:
                self.ahead.note([(deadline_id, doc["due_at"])])
                continue
            due.append(doc)
        return due

    async def _sweep(self, now: datetime) -> int:
        due = await self._due(now)
        self.overdue.set(len(due))
        fired: list[str] = []
        firings: list[tuple[Firing, datetime]] = []
        next_hours = []
        directory = self.directory.current
        attempts = {doc["_id"]: claim_attempt(doc["due_at"], now, self.lease) for doc in due}
        # A later attempt only takes over from a claim older than one lease: a replica still
        # busy with its claim (a long sweep) is not overtaken, so nothing fires twice.
        busy = await self.store.recent_claims(
            [f"{i}#{a - 1}" for i, a in attempts.items() if a > 0], now - self.lease
        )
        free = []
        for doc in due:
            attempt = attempts[doc["_id"]]
            if attempt > 0 and f"{doc['_id']}#{attempt - 1}" in busy:
                self.ahead.note([(doc["_id"], doc["due_at"])])  # looked at again next sweep
                continue
            free.append(doc)
        # One insert command claims them all (it was a round trip per deadline).
        claimed = await self.store.claim({doc["_id"]: attempts[doc["_id"]] for doc in free}, self.owner, now)
        for doc in free:
            if doc["_id"] not in claimed:
                self.lost_claims.inc()
                # Looked at again when its next attempt may be claimed (if the replica that
                # claimed this one dies before firing it), not only at the next read.
                next_attempt_at = doc["due_at"] + (attempts[doc["_id"]] + 1) * self.lease
                self.ahead.note([(doc["_id"], next_attempt_at)], keep=True)
                continue
            firing = firing_for(doc, directory)
            if firing is not None:
                firings.append((firing, doc["due_at"]))
            if doc["kind"] == HOURS:
                team = directory.team(doc["entity"])
                change = next_change(team, doc["due_at"]) if team else None
                if change is not None:
                    next_hours.append(hours_deadline(team.id, change))
            fired.append(doc["_id"])
            self.fired.labels(doc["kind"]).inc()
            self.lateness.labels(doc["kind"]).observe(max(0.0, (now - doc["due_at"]).total_seconds()))
        # Queued together, after the claims: durable at the flush, and a claim whose command
        # never went out (a crash before it) is fired again after its lease.
        for firing, due_at in firings:
            await self.outbox.send(firing.topic, firing.key, firing.command, id=_command_id(firing.command), time=due_at)
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
