"""What the read API (conversation-state's agent desktop views) costs as the store grows.

    python -m bench.read_api [--lines 100000] [--customers 2000] [--resolved 2] [--samples 10]

On a fresh database of its own (dropped at the end), through conversation-state's own store
code: ``--customers`` customers, each with ``--resolved`` (2) resolved conversations and a current one, and
``--lines`` transcript lines shared out among their conversations; half the customers'
conversations store their lines at positions (``<conversation>|<n>``, as conversation-state
writes them now), half by message id (as before 2026-12-04, session 18: read by a query of
``conversation_id``). Then, as another replica's read API (nothing in memory), for
``--samples`` customers of each half: a customer's view (``GET
/customers/{id}/conversation``) and their current conversation (``GET
/conversations/{id}``), then the queue of the team all the current conversations wait in
(``GET /teams/{team}/queue``). Prints the wall time per request (p50 / max) and the store
commands each took; asserts nothing. On the embedded FerretDB a query by anything but ``_id`` scans the
whole collection, so the by-message-id rows grow with ``--lines``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from pymongo import AsyncMongoClient, monitoring
from starlette.applications import Starlette

from bench.pipeline import endpoints
from services.conversation_state.lifecycle import CustomerRecords
from services.conversation_state.model import Conversation, Customer, Line
from services.conversation_state.read_api import read_routes
from services.conversation_state.store import ConversationStore, changes_of
from shared.contracts.common import Channel, ConversationStatus, Direction
from shared.teams import DirectoryWatcher

T0 = datetime(2026, 12, 1, 9, tzinfo=UTC)
QUEUE_TEAM = "pnw-seattle"  # every customer's current conversation waits in this team's queue
INSERT_CHUNK = 2000


class Commands(monitoring.CommandListener):
    """How many commands the client sent (to count what one request costs)."""

    def __init__(self) -> None:
        self.count = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.count += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def customer_records(n: int, positioned: bool, lines_each: int, resolved: int = 2) -> tuple[CustomerRecords, list[Line]]:
    """Customer ``n``: ``resolved`` resolved conversations and a current one, ``lines_each``
    lines in each, stored at positions or (``positioned`` False) by message id."""
    cid = f"cus_{n:06d}"
    customer = Customer(id=cid, home_team_id="pnw", home_team_source="area_code", created_at=T0)
    records = CustomerRecords(customer=customer)
    lines: list[Line] = []
    previous = None
    for k in range(resolved + 1):
        opened = T0 + timedelta(days=k)
        conv = Conversation(
            id=f"conv_{n:06d}_{k}", customer_id=cid, home_team_id="pnw", opened_at=opened, updated_at=opened,
            status=ConversationStatus.RESOLVED if k < resolved else ConversationStatus.WAITING_ON_AGENT,
            last_channel=Channel.SMS, previous_conversation_id=previous, team_id=QUEUE_TEAM if k == resolved else None,
            line_count=lines_each if positioned else None, inbound_count=lines_each,
        )  # fmt: skip
        records.conversations[conv.id] = conv
        previous = customer.last_conversation_id = conv.id
        for i in range(lines_each):
            lines.append(
                Line(
                    message_id=f"msg_{n:06d}_{k}_{i}", conversation_id=conv.id, customer_id=cid, direction=Direction.INBOUND,
                    channel=Channel.SMS, text="x" * 80, at=opened + timedelta(seconds=i), seq=i + 1 if positioned else None,
                )  # fmt: skip
            )
    customer.open_conversation_id = customer.last_conversation_id
    return records, lines


async def seed(store: ConversationStore, customers: int, lines: int, resolved: int = 2) -> None:
    lines_each = max(1, lines // (customers * (resolved + 1)))
    batch: list[Line] = []
    records: list[CustomerRecords] = []
    for n in range(customers):
        r, ls = customer_records(n, positioned=n % 2 == 0, lines_each=lines_each, resolved=resolved)
        records.append(r)
        batch += ls
        if len(batch) >= INSERT_CHUNK:
            await store.save_lines(batch)
            batch = []
    await store.save_lines(batch)
    await store.write_changes(changes_of(records))


async def timed(http: httpx.AsyncClient, commands: Commands, path: str) -> tuple[float, int]:
    before = commands.count
    started = time.perf_counter()
    response = await http.get(path)
    response.raise_for_status()
    return time.perf_counter() - started, commands.count - before


async def run(mongodb_url: str, customers: int, lines: int, samples: int, resolved: int = 2) -> list[tuple[str, list[tuple[float, int]]]]:
    commands = Commands()
    client: AsyncMongoClient = AsyncMongoClient(mongodb_url, tz_aware=True, event_listeners=[commands])
    name = f"hometeam_readapi_{uuid.uuid4().hex[:8]}"
    store = ConversationStore(client[name])
    rows: list[tuple[str, list[tuple[float, int]]]] = []
    try:
        await store.ensure_indexes()
        started = time.perf_counter()
        await seed(store, customers, lines, resolved)
        print(
            f"seeded {customers:,} customers, {customers * (resolved + 1):,} conversations, "
            f"{await store.messages.count_documents({}):,} lines in {time.perf_counter() - started:.1f} s"
        )
        await asyncio.sleep(1.5)  # the embedded FerretDB indexes a new collection within 0.5 s
        app = Starlette(routes=read_routes(store, DirectoryWatcher(Path("deploy/teams.yaml")), None, None))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as http:
            step = max(2, customers // samples // 2 * 2)
            for label, first in (("at positions", 0), ("by message id (stored before)", 1)):
                picked = list(range(first, customers, step))[:samples]
                view = [await timed(http, commands, f"/customers/cus_{n:06d}/conversation") for n in picked]
                rows.append((f"customer view, lines {label}", view))
                conv = [await timed(http, commands, f"/conversations/conv_{n:06d}_{resolved}") for n in picked]
                rows.append((f"conversation view, lines {label}", conv))
            queue = [await timed(http, commands, f"/teams/{QUEUE_TEAM}/queue") for _ in range(max(3, samples // 3))]
            rows.append((f"team queue, {customers:,} waiting of {customers * (resolved + 1):,} stored (page of 50)", queue))
    finally:
        await client.drop_database(name)
        await client.close()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.read_api", description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=100_000)
    p.add_argument("--customers", type=int, default=2000)
    p.add_argument("--resolved", type=int, default=2, help="resolved conversations per customer, besides the current one")
    p.add_argument("--samples", type=int, default=10)
    args = p.parse_args(argv)
    _, mongodb_url = endpoints()
    rows = asyncio.run(run(mongodb_url, args.customers, args.lines, args.samples, args.resolved))
    per_customer = args.resolved + 1
    lines_each = max(1, args.lines // (args.customers * per_customer))
    print(f"read API ({mongodb_url.split('@')[-1].split('/?')[0]}; {per_customer} conversations of {lines_each} lines per customer)")
    print(f"  {'request':<66}{'p50 ms':>10}{'max ms':>10}{'commands':>10}")
    for label, samples in rows:
        ms = [s * 1000 for s, _ in samples]
        print(f"  {label:<66}{statistics.median(ms):>10.1f}{max(ms):>10.1f}{statistics.median(c for _, c in samples):>10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
