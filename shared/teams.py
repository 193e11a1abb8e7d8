"""The team directory: home teams, the regions they serve, their hours, agents, and the
standard pool; loaded from YAML (``deploy/teams.yaml``) and validated with clear errors.

Pure functions over it answer: which team serves this customer (``home_team_for``), and is
this team open at this instant (``is_open``, in the team's own time zone, DST-correct).
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    field_validator,
    model_validator,
)

from shared.contracts.common import Channel
from shared.contracts.routing import STANDARD_POOL_ID

TeamId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
AgentId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}$")]
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RANGE = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")
END_OF_DAY = time.max


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Agent(_Strict):
    id: AgentId
    max_concurrency: int = Field(ge=1, le=100)


class OpeningRange(_Strict):
    """One opening range within a day, local wall-clock time; ``end`` may be 24:00."""

    start: time
    end: time

    def contains(self, t: time) -> bool:
        return self.start <= t and (t < self.end or self.end == END_OF_DAY)


def _parse_range(text: str) -> OpeningRange:
    m = _RANGE.match(text.strip())
    if not m:
        raise ValueError(f"opening range {text!r} must look like 'HH:MM-HH:MM'")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if not (0 <= h1 < 24 and 0 <= m1 < 60 and 0 <= m2 < 60 and (h2 < 24 or (h2 == 24 and m2 == 0))):
        raise ValueError(f"opening range {text!r} has an invalid time")
    start = time(h1, m1)
    end = END_OF_DAY if h2 == 24 else time(h2, m2)
    if end <= start:
        raise ValueError(
            f"opening range {text!r} ends before it starts; split overnight hours across two days"
        )
    return OpeningRange(start=start, end=end)


class Closure(_Strict):
    """A one-off closure in the team's local time, [start, end)."""

    start: datetime = Field(alias="from")
    end: datetime = Field(alias="to")

    @model_validator(mode="after")
    def _ordered(self) -> Closure:
        if self.start.tzinfo or self.end.tzinfo:
            raise ValueError("closures are in the team's local time: give no UTC offset")
        if self.end <= self.start:
            raise ValueError(f"closure ends ({self.end}) before it starts ({self.start})")
        return self


class Regions(_Strict):
    zip_prefixes: list[Annotated[str, StringConstraints(pattern=r"^[0-9]{1,5}$")]] = []
    area_codes: list[Annotated[str, StringConstraints(pattern=r"^[2-9][0-9]{2}$")]] = []
    markets: list[Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]] = []


class Surge(_Strict):
    """A team surges when its queue is deeper, or its oldest wait longer, than this."""

    max_queue_depth: int = Field(default=25, ge=1)
    max_oldest_wait_seconds: int = Field(default=900, ge=1)


class Team(_Strict):
    id: TeamId
    name: str
    timezone: str
    regions: Regions = Regions()
    hours: dict[str, list[OpeningRange]]
    holidays: list[date] = []
    closures: list[Closure] = []
    response_target_seconds: int = Field(default=300, ge=10)
    surge: Surge = Surge()
    cost_per_agent_hour: float | None = Field(default=None, ge=0, description="Loaded cost of a staffed agent-hour")
    agents: list[Agent] = Field(min_length=1)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator("hours", mode="before")
    @classmethod
    def _parse_hours(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError("hours must map weekdays (mon..sun) to lists of 'HH:MM-HH:MM'")
        out: dict[str, list[OpeningRange]] = {}
        for day, ranges in value.items():
            if day not in WEEKDAYS:
                raise ValueError(f"unknown weekday {day!r}; use one of {', '.join(WEEKDAYS)}")
            if not isinstance(ranges, list):
                raise ValueError(f"hours for {day} must be a list")
            parsed = [r if isinstance(r, OpeningRange) else _parse_range(str(r)) for r in ranges]
            parsed.sort(key=lambda r: r.start)
            for a, b in zip(parsed, parsed[1:], strict=False):
                if b.start < a.end:
                    raise ValueError(f"opening ranges overlap on {day}")
            out[day] = parsed
        return out

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class StandardPool(_Strict):
    agents: list[Agent] = Field(min_length=1)
    response_target_seconds: int = Field(default=300, ge=10)
    cost_per_agent_hour: float | None = Field(default=None, ge=0)


class Capacity(_Strict):
    """Async-aware load: a conversation waiting on the customer weighs less."""

    waiting_on_agent_weight: float = Field(default=1.0, gt=0, le=1)
    waiting_on_customer_weight: float = Field(default=0.5, gt=0, le=1)


class TeamDirectory(_Strict):
    relationship_window_days: int = Field(default=30, ge=0)
    capacity: Capacity = Capacity()
    default_team: TeamId
    standard_pool: StandardPool
    teams: list[Team] = Field(min_length=1)

    _teams: dict[str, Team] = PrivateAttr(default_factory=dict)
    _pool_agents: dict[str, dict[str, Agent]] = PrivateAttr(default_factory=dict)
    _agent_pool: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> TeamDirectory:
        ids = [t.id for t in self.teams]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate team ids: {dupes}")
        if STANDARD_POOL_ID in ids:
            raise ValueError(f"'{STANDARD_POOL_ID}' is reserved for the standard pool")
        if self.default_team not in ids:
            raise ValueError(f"default_team {self.default_team!r} is not a team")
        agents = [a.id for a in self.standard_pool.agents] + [a.id for t in self.teams for a in t.agents]
        dupes = sorted({a for a in agents if agents.count(a) > 1})
        if dupes:
            raise ValueError(f"agents listed in more than one pool: {dupes}")
        for kind in ("zip_prefixes", "area_codes", "markets"):
            seen: dict[str, str] = {}
            for team in self.teams:
                for value in getattr(team.regions, kind):
                    if value in seen and seen[value] != team.id:
                        raise ValueError(f"{kind} {value!r} is served by {seen[value]} and {team.id}")
                    seen[value] = team.id
        return self

    # Lookups used on hot paths; the directory is immutable, so they are safe to cache. Read
    # from ``__pydantic_private__`` directly: ``self._teams`` goes through pydantic's
    # ``BaseModel.__getattr__`` (~5% of the sweeper's CPU, a lookup per event).
    def team(self, team_id: str) -> Team | None:
        return self.__pydantic_private__["_teams"].get(team_id)  # type: ignore[index,no-any-return]

    def pool_of_agent(self, agent_id: str) -> str | None:
        return self.__pydantic_private__["_agent_pool"].get(agent_id)  # type: ignore[index,no-any-return]

    def agents_of(self, pool_id: str) -> dict[str, Agent]:
        return self.__pydantic_private__["_pool_agents"].get(pool_id, {})  # type: ignore[index,no-any-return]

    @property
    def standard_pool_response_target_seconds(self) -> int:
        return self.standard_pool.response_target_seconds

    def model_post_init(self, _: Any) -> None:
        teams = {t.id: t for t in self.teams}
        pool_agents = {t.id: {a.id: a for a in t.agents} for t in self.teams}
        pool_agents[STANDARD_POOL_ID] = {a.id: a for a in self.standard_pool.agents}
        agent_pool = {a: p for p, agents in pool_agents.items() for a in agents}
        self._teams = teams
        self._pool_agents = pool_agents
        self._agent_pool = agent_pool


class TeamConfigError(ValueError):
    """The team configuration file is missing or invalid; the message says where and why."""


def load_directory(path: str | Path) -> TeamDirectory:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise TeamConfigError(f"team configuration {p} does not exist") from exc
    except yaml.YAMLError as exc:
        raise TeamConfigError(f"team configuration {p} is not valid YAML: {exc}") from exc
    return parse_directory(raw, source=str(p))


def parse_directory(raw: Any, source: str = "<config>") -> TeamDirectory:
    from pydantic import ValidationError

    try:
        return TeamDirectory.model_validate(raw)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        ]
        raise TeamConfigError(f"team configuration {source} is invalid:\n" + "\n".join(lines)) from exc


def is_open(team: Team, at: datetime) -> bool:
    """Is the team open at instant ``at``: weekly hours in its own zone, minus holidays and
    one-off closures (both in local time)."""
    if at.tzinfo is None:
        raise ValueError("is_open needs an aware datetime")
    local = at.astimezone(team.zone)
    if local.date() in team.holidays:
        return False
    naive = local.replace(tzinfo=None)
    if any(c.start <= naive < c.end for c in team.closures):
        return False
    ranges = team.hours.get(WEEKDAYS[local.weekday()], [])
    t = local.time()
    return any(r.contains(t) for r in ranges)


def next_change(team: Team, at: datetime, horizon: timedelta = timedelta(days=14)) -> datetime | None:
    """The first instant after ``at`` when the team opens or closes (minute resolution), in
    UTC, or None if nothing changes within the horizon. UTC because a local time in a repeated
    hour never compares equal to an instant of another zone (PEP 495)."""
    state = is_open(team, at)
    at = at.astimezone(UTC)  # compare instants, never wall-clock times of one zone
    candidates: set[datetime] = set()
    local = at.astimezone(team.zone)
    day = local.date()
    for offset in range(horizon.days + 1):
        d = day + timedelta(days=offset)
        starts = [datetime.combine(d, time(0, 0))]
        for r in team.hours.get(WEEKDAYS[d.weekday()], []):
            starts.append(datetime.combine(d, r.start))
            starts.append(datetime.combine(d + timedelta(days=1), time(0, 0)) if r.end == END_OF_DAY else datetime.combine(d, r.end))
        candidates.update(starts)
    for c in team.closures:
        candidates.update((c.start, c.end))
    # A wall-clock time in a repeated (fall-back) hour happens twice; one in a skipped
    # (spring-forward) hour never happens, and the change then falls on the offset change itself.
    instants = {naive.replace(tzinfo=team.zone, fold=fold).astimezone(UTC) for naive in candidates for fold in (0, 1)}
    instants.update(_offset_changes(team.zone, day, day + timedelta(days=horizon.days + 1)))
    for instant in sorted(instants):
        if instant <= at or instant - at > horizon:
            continue
        if is_open(team, instant) != state:
            return instant
    return None


def _offset_changes(zone: ZoneInfo, first: date, last: date) -> list[datetime]:
    """The instants (UTC, to the second) at which ``zone``'s UTC offset changes, on local days
    ``first`` to ``last`` inclusive; at most one change per day is assumed."""
    changes = []
    d = first
    while d <= last:
        lo = int(datetime.combine(d, time(0, 0), tzinfo=zone).timestamp())
        hi = int(datetime.combine(d + timedelta(days=1), time(0, 0), tzinfo=zone).timestamp())
        before = datetime.fromtimestamp(lo, zone).utcoffset()
        if datetime.fromtimestamp(hi, zone).utcoffset() != before:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if datetime.fromtimestamp(mid, zone).utcoffset() == before:
                    lo = mid
                else:
                    hi = mid
            changes.append(datetime.fromtimestamp(hi, UTC))
        d += timedelta(days=1)
    return changes


_NANP = re.compile(r"^\+1([2-9][0-9]{2})[0-9]{7}$")


def home_team_for(
    directory: TeamDirectory,
    *,
    channel: Channel,
    address: str,
    zip_code: str | None = None,
    market: str | None = None,
) -> tuple[str, str]:
    """The team that serves a new customer, and how it was chosen: an explicit market first,
    then the longest matching ZIP prefix, then the phone's area code, else the default team."""
    if market:
        for team in directory.teams:
            if market in team.regions.markets:
                return team.id, "market"
    if zip_code:
        best: tuple[int, str] | None = None
        for team in directory.teams:
            for prefix in team.regions.zip_prefixes:
                if zip_code.startswith(prefix) and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), team.id)
        if best:
            return best[1], "zip"
    if channel == Channel.SMS:
        m = _NANP.match(address)
        if m:
            for team in directory.teams:
                if m.group(1) in team.regions.area_codes:
                    return team.id, "area_code"
    return directory.default_team, "default"


class DirectoryWatcher:
    """Holds the current team directory and reloads it when its file changes. An invalid new
    file is reported and ignored: the last good directory stays in force. Routing state
    (presence, loads, queues) lives elsewhere, so a reload loses none of it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.current = load_directory(self.path)
        self._mtime = self.path.stat().st_mtime_ns

    def reload_if_changed(self) -> bool:
        import logging

        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            logging.getLogger("hometeam.teams").error("team configuration %s disappeared", self.path)
            return False
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            self.current = load_directory(self.path)
        except TeamConfigError as exc:
            logging.getLogger("hometeam.teams").error("keeping the previous team configuration: %s", exc)
            return False
        logging.getLogger("hometeam.teams").info("team configuration reloaded from %s", self.path)
        return True

    async def watch(self, interval_s: float = 5.0) -> None:
        import asyncio

        while True:
            await asyncio.sleep(interval_s)
            self.reload_if_changed()
