"""A live terminal view of a running hometeam: ``python -m tools.live`` (see ``__main__``).

What it shows, and where from:

- per pool (each home team and the standard pool): open or closed now in the team's own time
  zone, queue depth, oldest wait, agents online, load against online capacity and the surge
  flag, from the metrics service's ``GET /kpis`` (``pools``, fed by ``pools.status.v1``), and
  the conversations held by agents, from conversation-state's read API
  (``/teams/{team}/queue``);
- the latest routing outcomes (ConversationAssigned / ConversationQueued on
  ``conversations.events.v1``) with the agent reason and the pool reason, overflow to the
  standard pool counted by reason, and how agents were chosen;
- the KPIs per team from ``GET /kpis``: closed conversations per staffed hour, lines per turn,
  first response and resolution times, CSAT, overflow;
- the simulator's progress, if it keeps a status file, and the URLs to look at.

No personal data: lifecycle events carry none (no addresses, no text), customer ids are shown
truncated, and nothing is read from transcripts.

``collect`` gathers a ``Snapshot``; ``render`` turns one into text (pure; ANSI colours only
when asked). Both are used by the CLI and by the tests.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer

from shared.contracts.registry import CONVERSATION_EVENTS
from shared.contracts.routing import STANDARD_POOL_ID
from shared.teams import TeamDirectory, WEEKDAYS, is_open

OVERFLOW_REASONS = ("after_hours", "surge", "opt_out")
RECENT = 10


def short_customer(customer_id: str) -> str:
    return customer_id[:12] + "…" if len(customer_id) > 12 else customer_id


@dataclass(frozen=True, slots=True)
class Routing:
    """One routing outcome as the view lists it (no personal data)."""

    at: datetime
    customer: str  # truncated customer id
    assigned: bool
    pool: str
    team_id: str
    agent_id: str | None
    reason: str | None
    pool_reason: str
    position: int | None = None


class EventFeed:
    """Reads ``conversations.events.v1`` (no consumer group; starts ``history`` records back
    on each partition) and keeps the latest routing outcomes and counts."""

    def __init__(self, bootstrap: str, topic_prefix: str = "", history: int = 300, kafka_options: dict[str, Any] | None = None) -> None:
        self.bootstrap = bootstrap
        self.topic = topic_prefix + CONVERSATION_EVENTS.name
        self.history = history
        self.kafka_options = kafka_options or {}
        self.recent: deque[Routing] = deque(maxlen=RECENT)
        self.overflow: Counter[str] = Counter()
        self.agent_reasons: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.since: datetime | None = None
        self._placed: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._consumer: AIOKafkaConsumer | None = None
        self.error: str | None = None

    async def start(self, timeout_s: float = 20.0) -> None:
        consumer = AIOKafkaConsumer(
            self.topic, bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", **self.kafka_options
        )
        await consumer.start()
        self._consumer = consumer
        deadline = time.monotonic() + timeout_s
        while not consumer.assignment():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no partitions of {self.topic}")
            await asyncio.sleep(0.1)
        partitions = list(consumer.assignment())
        ends = await consumer.end_offsets(partitions)
        begins = await consumer.beginning_offsets(partitions)
        for tp in partitions:
            consumer.seek(tp, max(begins[tp], ends[tp] - self.history))

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def poll(self, timeout_ms: int = 50) -> None:
        if self._consumer is None:
            return
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=5000)
        records = sorted((r for batch in batches.values() for r in batch), key=lambda r: r.timestamp)
        for record in records:
            try:
                self.fold(json.loads(record.value))
            except (ValueError, KeyError, TypeError):
                self.counts["unreadable"] += 1

    def _first(self, *key: str) -> bool:
        if key in self._placed:
            return False
        self._placed[key] = None
        if len(self._placed) > 100_000:
            self._placed.popitem(last=False)
        return True

    def fold(self, envelope: dict[str, Any]) -> None:
        """Count one event (an envelope of ``conversations.events.v1``)."""
        kind = envelope.get("type", "").removeprefix("hometeam.")
        data = envelope.get("data") or {}
        if kind not in ("ConversationAssigned", "ConversationQueued", "ConversationOpened", "ConversationResolved", "ConversationClosed"):
            return
        at = datetime.fromisoformat(str(data.get("at") or envelope["time"]).replace("Z", "+00:00"))
        if self.since is None or at < self.since:
            self.since = at
        conversation = str(data.get("conversation_id", ""))
        if kind in ("ConversationOpened", "ConversationResolved", "ConversationClosed"):
            self.counts[kind] += 1
            return
        assigned = kind == "ConversationAssigned"
        pool_reason = str(data.get("pool_reason", ""))
        routing = Routing(
            at=at,
            customer=short_customer(str(data.get("customer_id", ""))),
            assigned=assigned,
            pool=str(data.get("pool", "")),
            team_id=str(data.get("team_id", "")),
            agent_id=data.get("agent_id"),
            reason=data.get("reason") if assigned else "queued",
            pool_reason=pool_reason,
            position=data.get("queue_position"),
        )
        self.recent.appendleft(routing)
        self.counts[kind] += 1
        self.agent_reasons[routing.reason or "queued"] += 1
        # A conversation overflowed once per placement, however often it is queued/assigned.
        if routing.pool == "standard" and pool_reason in OVERFLOW_REASONS and self._first(conversation, "overflow", pool_reason):
            self.overflow[pool_reason] += 1
        if pool_reason == "returned_home" and self._first(conversation, "returned", routing.team_id):
            self.overflow["returned_home"] += 1


@dataclass
class PoolRow:
    pool_id: str
    name: str
    open: bool | None  # None: the 24/7 standard pool
    hours_today: str
    local_time: str
    agents_total: int
    queue_depth: int | None = None
    oldest_wait_s: float | None = None
    agents_online: int | None = None
    capacity_online: float | None = None
    load: float | None = None
    surging: bool = False
    held: int | None = None  # open conversations assigned to agents (read API)
    waiting: int | None = None  # open conversations waiting (read API)


@dataclass
class Snapshot:
    now: datetime
    pools: list[PoolRow]
    recent: list[Routing]
    overflow: dict[str, int]
    agent_reasons: dict[str, int]
    events_since: datetime | None
    kpis: dict[str, dict[str, Any]]
    kpi_window: tuple[str, str] | None
    urls: dict[str, str]
    simulator: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    kpis_as_of: datetime | None = None  # when the KPIs and pool figures were read


def _hours_today(directory: TeamDirectory, pool_id: str, now: datetime) -> tuple[bool | None, str, str]:
    team = directory.team(pool_id)
    if team is None:
        return None, "24/7", "-"
    local = now.astimezone(team.zone)
    ranges = team.hours.get(WEEKDAYS[local.weekday()], [])
    if local.date() in team.holidays:
        hours = "holiday"
    elif not ranges:
        hours = "closed today"
    else:
        hours = ",".join(f"{r.start:%H:%M}-{'24:00' if r.end.hour == 23 and r.end.minute == 59 else f'{r.end:%H:%M}'}" for r in ranges)
    return is_open(team, now), hours, f"{local:%a %H:%M}"


async def _get_json(client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None, timeout: float = 3.0) -> Any:
    response = await client.get(url, headers=headers, timeout=timeout)
    response.raise_for_status()
    return response.json()


async def collect(
    directory: TeamDirectory,
    *,
    metrics: httpx.AsyncClient,
    state: httpx.AsyncClient,
    feed: EventFeed | None,
    urls: dict[str, str],
    metrics_base: str = "",
    state_base: str = "",
    read_token: str | None = None,
    sim_status: Path | None = None,
    now: datetime | None = None,
    previous: Snapshot | None = None,
    timeout_s: float = 3.0,
    queues: bool = True,
) -> Snapshot:
    """Everything the view shows, now. Unreachable sources become a line in ``problems``;
    what they showed last time (``previous``) is kept meanwhile."""
    now = now or datetime.now(UTC)
    problems: list[str] = []
    pool_ids = [t.id for t in directory.teams] + [STANDARD_POOL_ID]
    rows: dict[str, PoolRow] = {}
    for pool_id in pool_ids:
        is_open_now, hours, local = _hours_today(directory, pool_id, now)
        team = directory.team(pool_id)
        rows[pool_id] = PoolRow(
            pool_id=pool_id,
            name=team.name if team else "Standard pool (24/7)",
            open=is_open_now,
            hours_today=hours,
            local_time=local,
            agents_total=len(directory.agents_of(pool_id)),
        )

    headers = {"authorization": f"Bearer {read_token}"} if read_token else None

    async def kpis() -> dict[str, Any] | None:
        try:
            return await _get_json(metrics, f"{metrics_base}/kpis", timeout=timeout_s)
        except (httpx.HTTPError, ValueError) as exc:
            problems.append(f"metrics /kpis: {type(exc).__name__}")
            return None

    async def queue(pool_id: str) -> tuple[str, dict[str, Any] | None]:
        try:
            return pool_id, await _get_json(state, f"{state_base}/teams/{pool_id}/queue?page=1&page_size=1", headers, timeout=timeout_s)
        except (httpx.HTTPError, ValueError) as exc:
            return pool_id, {"error": type(exc).__name__}

    # The read API is asked only when ``queues`` (the CLI does every few seconds: it reads the
    # store); otherwise the previous figures stand.
    results = await asyncio.gather(kpis(), *(queue(p) for p in (pool_ids if queues or previous is None else [])))
    body = results[0]
    queue_errors = set()
    if not (queues or previous is None):
        for old in previous.pools:
            if old.pool_id in rows:
                rows[old.pool_id].held, rows[old.pool_id].waiting = old.held, old.waiting
    for pool_id, q in results[1:]:
        if q is None or "error" in q:
            queue_errors.add(str(q.get("error")) if q else "?")
            continue
        rows[pool_id].waiting = int(q.get("waiting_total", 0))
        rows[pool_id].held = sum(len(v) for v in (q.get("assigned") or {}).values())
    if queue_errors:
        problems.append(f"read API /teams/<team>/queue: {', '.join(sorted(queue_errors))}")
        if previous is not None:
            for old in previous.pools:
                if old.pool_id in rows and rows[old.pool_id].held is None:
                    rows[old.pool_id].held, rows[old.pool_id].waiting = old.held, old.waiting

    kpi_rows: dict[str, dict[str, Any]] = {}
    window = None
    kpis_as_of = now if body is not None else None
    if body is None and previous is not None and previous.kpis_as_of is not None:
        kpis_as_of = previous.kpis_as_of
        problems.append(f"showing the KPIs and pool figures read at {kpis_as_of:%H:%M:%S}")
        kpi_rows, window = previous.kpis, previous.kpi_window
        for old in previous.pools:
            row = rows.get(old.pool_id)
            if row is not None:
                row.queue_depth, row.oldest_wait_s, row.agents_online = old.queue_depth, old.oldest_wait_s, old.agents_online
                row.capacity_online, row.load, row.surging = old.capacity_online, old.load, old.surging
    if body is not None:
        window = (body.get("from", ""), body.get("to", ""))
        kpi_rows = dict(body.get("kpis") or {})
        for pool_id, p in (body.get("pools") or {}).items():
            row = rows.get(pool_id)
            if row is None:
                continue
            row.queue_depth = p.get("queue_depth")
            row.oldest_wait_s = p.get("oldest_wait_seconds")
            row.agents_online = p.get("agents_online")
            row.capacity_online = p.get("capacity_online")
            row.load = p.get("load")
            row.surging = bool(p.get("surging"))

    simulator = None
    if sim_status is not None:
        try:
            simulator = json.loads(sim_status.read_text())
        except FileNotFoundError:
            simulator = {"phase": "not started"}
        except (OSError, ValueError):
            simulator = None
    if feed is not None and feed.error:
        problems.append(f"events: {feed.error}")
    return Snapshot(
        now=now,
        pools=[rows[p] for p in pool_ids],
        recent=list(feed.recent) if feed else [],
        overflow=dict(feed.overflow) if feed else {},
        agent_reasons=dict(feed.agent_reasons) if feed else {},
        events_since=feed.since if feed else None,
        kpis=kpi_rows,
        kpi_window=window,
        urls=urls,
        simulator=simulator,
        problems=problems,
        kpis_as_of=kpis_as_of,
    )


# -- rendering -------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
BOLD, DIM, RED, GREEN, YELLOW, CYAN, RESET = "\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[36m", "\x1b[0m"


def visible_len(text: str) -> int:
    return len(_ANSI.sub("", text))


def _pad(text: str, width: int, right: bool = False) -> str:
    gap = max(0, width - visible_len(text))
    return (" " * gap + text) if right else (text + " " * gap)


def _num(value: float | None, fmt: str = "{:.1f}", none: str = "-") -> str:
    return none if value is None else fmt.format(value)


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.0f}s"
    if value < 7200:
        return f"{value / 60:.0f}m"
    return f"{value / 3600:.1f}h"


def _time(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        return f"{datetime.fromisoformat(iso):%H:%M:%S}"
    except ValueError:
        return iso


def render(snap: Snapshot, *, color: bool = False, width: int = 120) -> str:
    """The view as text; the same content with or without colours."""

    def c(code: str, text: str) -> str:
        return f"{code}{text}{RESET}" if color else text

    lines: list[str] = []
    lines.append(c(BOLD, "hometeam live") + f" · {snap.now:%Y-%m-%d %H:%M:%S} UTC · Ctrl-C stops everything")
    sim = snap.simulator
    if sim:
        counters = sim.get("counters") or {}
        head = f"simulator {sim.get('phase', '?')}"
        if sim.get("elapsed_s") is not None and sim.get("duration_s"):
            head += f", {sim['elapsed_s']:.0f}s of {sim['duration_s']:.0f}s · seed {sim.get('seed')} · {sim.get('rate')} customer msgs/s"
        lines.append(head)
        if counters:
            lines.append(
                f"  {counters.get('customer_messages', 0)} customer messages ({counters.get('via_webhook', 0)} via signed webhooks,"
                f" {counters.get('via_topic', 0)} on channel.inbound.v1) · {counters.get('agent_replies', 0)} agent replies"
                f" · {counters.get('agent_resolves', 0)} resolves · {counters.get('surveys', 0)} surveys"
            )
        extras = []
        surges = sim.get("surges") or []
        now_iso = snap.now.isoformat()
        current = [s for s in surges if s.get("to", "") >= now_iso]
        shown = current[:1] or surges[-1:]
        for s in shown:
            when = "now" if s.get("from", "") <= now_iso <= s.get("to", "") else ("next" if s.get("from", "") > now_iso else "last")
            extras.append(f"surge ({when}): {s['team']}'s region {_time(s.get('from'))}-{_time(s.get('to'))}, {s.get('customers')} customers")
        opt = sim.get("opt_out")
        if opt:
            who = opt.get("customer") or opt.get("team")
            extras.append(f"opt-out customer {who}: {'opted out' if opt.get('opted_out') else 'not opted out yet'}")
        away = sim.get("agents_away") or []
        if away:
            extras.append("away: " + ", ".join(away))
        if extras:
            lines.append("  " + " · ".join(extras))
    for problem in snap.problems:
        lines.append(c(YELLOW, f"! {problem}"))
    lines.append("")

    # Pools
    header = ["POOL", "hours today", "local", "queue", "oldest", "online", "load/cap", "held", "state"]
    widths = [19, 13, 10, 6, 7, 7, 12, 5, 14]
    right = [False, False, False, True, True, True, True, True, False]
    lines.append(c(BOLD, " ".join(_pad(h, w, r) for h, w, r in zip(header, widths, right, strict=True)).rstrip()))
    for row in snap.pools:
        if row.open is None:
            state = c(CYAN, "24/7")
        elif row.open:
            state = c(GREEN, "open")
        else:
            state = c(DIM, "closed")
        if row.surging:
            state += " " + c(RED + BOLD, "SURGE")
        online = "-" if row.agents_online is None else f"{row.agents_online}/{row.agents_total}"
        load = "-" if row.load is None else f"{row.load:.1f}/{row.capacity_online or 0:.0f}"
        cells = [
            row.pool_id,
            row.hours_today,
            row.local_time,
            _num(row.queue_depth, "{:d}"),
            _secs(row.oldest_wait_s) if row.queue_depth else "-",
            online,
            load,
            _num(row.held, "{:d}"),
            state,
        ]
        lines.append(" ".join(_pad(v, w, r) for v, w, r in zip(cells, widths, right, strict=True)).rstrip())
    lines.append("")

    # Recent routing
    since = f"since {snap.events_since:%H:%M:%S}" if snap.events_since else "waiting for events"
    lines.append(c(BOLD, f"RECENT ROUTING (last {RECENT})") + f"  {since}")
    if not snap.recent:
        lines.append("  (none yet)")
    for r in snap.recent:
        if r.assigned:
            what = f"assigned  {r.team_id} / {r.agent_id}"
            reason = r.reason or ""
        else:
            what = f"queued    {r.team_id}" + (f" #{r.position}" if r.position else "")
            reason = ""
        pool_reason = r.pool_reason
        if pool_reason in OVERFLOW_REASONS:
            pool_reason = c(YELLOW, pool_reason)
        lines.append(f"  {r.at:%H:%M:%S}  {_pad(r.customer, 14)} {_pad(what, 38)} {_pad(reason, 22)} pool: {pool_reason}")
    lines.append("")
    overflow = " · ".join(f"{k} {snap.overflow.get(k, 0)}" for k in OVERFLOW_REASONS)
    lines.append(c(BOLD, "OVERFLOW to the standard pool") + f"  {overflow} · returned home {snap.overflow.get('returned_home', 0)}  (conversations, {since})")
    reasons = " · ".join(f"{k} {v}" for k, v in sorted(snap.agent_reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    lines.append(c(BOLD, "AGENT CHOICE") + f"  {reasons or '-'}")
    lines.append("")

    # KPIs
    window = "unavailable"
    if snap.kpi_window:
        try:
            start, end = (datetime.fromisoformat(t) for t in snap.kpi_window)
            window = f"last {(end - start).total_seconds() / 3600:.0f} h, to {end:%H:%M} UTC"  # /kpis widens to whole hours
        except ValueError:
            window = " - ".join(snap.kpi_window)
    lines.append(c(BOLD, "KPIs per team") + f"  (GET /kpis, {window}; closed/h is per staffed agent-hour)")
    header = ["team", "routed", "closed", "staffed h", "closed/h", "lines/turn", "1st resp", "resolve", "CSAT", "overflow ah/su/oo"]
    widths = [19, 6, 6, 9, 8, 10, 8, 8, 9, 17]
    lines.append(c(BOLD, " ".join(_pad(h, w, i > 0 and i < 9) for i, (h, w) in enumerate(zip(header, widths, strict=True))).rstrip()))
    order = [p.pool_id for p in snap.pools] + sorted(k for k in snap.kpis if k not in {p.pool_id for p in snap.pools})
    for team in order:
        k = snap.kpis.get(team)
        if not k:
            continue
        o = k.get("overflow") or {}
        csat = "-" if k.get("csat_average") is None else f"{k['csat_average']:.2f} ({k.get('csat_responses', 0):.0f})"
        cells = [
            team,
            _num(k.get("routed"), "{:.0f}"),
            _num(k.get("closed"), "{:.0f}"),
            _num(k.get("staffed_hours"), "{:.2f}"),
            _num(k.get("closed_per_staffed_hour"), "{:.1f}"),
            _num(k.get("lines_per_turn"), "{:.2f}"),
            _secs(k.get("first_response_seconds_avg")),
            _secs(k.get("resolution_seconds_avg")),
            csat,
            f"{o.get('after_hours', 0):.0f}/{o.get('surge', 0):.0f}/{o.get('opt_out', 0):.0f}",
        ]
        lines.append(" ".join(_pad(v, w, i > 0 and i < 9) for i, (v, w) in enumerate(zip(cells, widths, strict=True))).rstrip())
    if not snap.kpis:
        lines.append("  (no KPIs yet)")
    lines.append("")

    lines.append(c(BOLD, "LOOK HERE"))
    for label, url in snap.urls.items():
        lines.append(f"  {_pad(label, 14)} {url}")
    return "\n".join(line if visible_len(line) <= width else _truncate(line, width) for line in lines)


def _truncate(line: str, width: int) -> str:
    """Cut a line to ``width`` visible characters, keeping colour codes balanced."""
    out, seen, i = [], 0, 0
    while i < len(line) and seen < width:
        m = _ANSI.match(line, i)
        if m:
            out.append(m.group())
            i = m.end()
            continue
        out.append(line[i])
        seen += 1
        i += 1
    return "".join(out) + (RESET if "\x1b[" in line else "")
