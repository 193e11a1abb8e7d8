"""``GET /kpis``: the messaging KPIs over a time window, per team (and per agent), as JSON.
Read from the store, so the numbers survive a restart of the service."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shared.runtime.http import problem
from shared.teams import DirectoryWatcher

from services.metrics.kpis import COUNTERS, hour_of, overlap_seconds, summarize
from services.metrics.store import KpiStore, agent_counters

MAX_WINDOW = timedelta(days=93)


def _parse_time(value: str | None, default: datetime) -> datetime:
    if value is None:
        return default
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError("times need a UTC offset")
    return parsed


def kpi_routes(store: KpiStore, directory: DirectoryWatcher, clock: Callable[[], datetime], default_cost_per_hour: float) -> list[Route]:
    def cost_of(team: str) -> float:
        t = directory.current.team(team)
        if t is not None and t.cost_per_agent_hour is not None:
            return t.cost_per_agent_hour
        if team == "standard" and directory.current.standard_pool.cost_per_agent_hour is not None:
            return directory.current.standard_pool.cost_per_agent_hour
        return default_cost_per_hour

    async def kpis(request: Request) -> Response:
        now = clock()
        try:
            end = _parse_time(request.query_params.get("to"), now)
            start = _parse_time(request.query_params.get("from"), end - timedelta(hours=24))
        except ValueError as exc:
            return problem(400, f"from/to must be ISO 8601 times with an offset: {exc}")
        if not start < end or end - start > MAX_WINDOW:
            return problem(400, f"the window must be non-empty and at most {MAX_WINDOW.days} days")
        group_by = request.query_params.get("group_by", "team")
        if group_by not in ("team", "agent"):
            return problem(400, "group_by must be team or agent")
        team_filter = request.query_params.get("team")

        # Hourly buckets: the window is widened to whole hours.
        first_hour, last_hour = hour_of(start), hour_of(end - timedelta(microseconds=1)) + timedelta(hours=1)
        sums: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(COUNTERS, 0.0))
        for doc in await store.buckets_between(first_hour, last_hour, team_filter):
            for agent, counters in agent_counters(doc):
                key = doc["team"] if group_by == "team" else f"{doc['team']}/{agent}"
                for counter, value in counters.items():
                    sums[key][counter] = sums[key].get(counter, 0.0) + value
        staffed: dict[str, float] = defaultdict(float)
        for interval in await store.intervals_overlapping(first_hour, last_hour):
            if team_filter and interval["team"] != team_filter:
                continue
            key = interval["team"] if group_by == "team" else f"{interval['team']}/{interval['agent']}"
            staffed[key] += overlap_seconds(interval["start"], interval["end"], first_hour, last_hour, now)
        groups = {}
        for key in sorted(set(sums) | set(staffed)):
            team = key.split("/")[0]
            groups[key] = summarize(sums.get(key, {}), staffed.get(key, 0.0), cost_of(team))
        pools = {}
        for doc in await store.all_pools():
            if team_filter and doc["_id"] != team_filter:
                continue
            oldest = doc.get("oldest_waiting_since")
            pools[doc["_id"]] = {
                "queue_depth": doc["queue_depth"],
                "oldest_wait_seconds": max(0.0, (now - oldest).total_seconds()) if oldest else 0.0,
                "agents_online": doc["agents_online"],
                "capacity_online": doc["capacity_online"],
                "load": doc["load"],
                "load_ratio": doc["load"] / doc["capacity_online"] if doc["capacity_online"] else None,
                "surging": doc["surging"],
                "as_of": doc["at"].isoformat(),
            }
        return JSONResponse(
            {
                "from": first_hour.isoformat(),
                "to": last_hour.isoformat(),
                "group_by": group_by,
                "kpis": groups,
                "pools": pools,
            }
        )

    return [Route("/kpis", kpis, methods=["GET"])]
