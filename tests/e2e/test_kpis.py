"""A scripted day with known ground truth produces exactly the expected KPIs on /kpis (and, when
scraped by a real Prometheus server, in PromQL; see test_prometheus_kpis)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pymongo import AsyncMongoClient

from services.conversation_state.app import ConversationStateSettings
from services.conversation_state.app import create_service as conversation_state
from services.ingest.app import IngestSettings
from services.ingest.app import create_service as ingest
from services.metrics.app import MetricsSettings
from services.metrics.app import create_service as metrics
from services.team_routing.app import TeamRoutingSettings
from services.team_routing.app import create_service as team_routing
from shared.contracts.agents import AgentPresenceChanged, Presence, ReplyToCustomer, ResolveConversation
from shared.contracts.surveys import SurveyAnswered
from shared.runtime.compact import expand_document
from tests.e2e.conftest import DAY, System
from tests.support import eventually, isolated_run, running, service_settings

T = DAY  # 18:00 UTC
TEAMS = {
    "default_team": "kpi",
    "standard_pool": {"agents": [{"id": "std-1", "max_concurrency": 10}], "cost_per_agent_hour": 25.0},
    "teams": [
        {
            "id": "kpi",
            "name": "KPI team",
            "timezone": "UTC",
            "hours": {d: ["00:00-20:30"] for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")},
            "cost_per_agent_hour": 30.0,
            "agents": [{"id": "k-1", "max_concurrency": 5}, {"id": "k-2", "max_concurrency": 5}],
        }
    ],
}

# Ground truth of the scripted day, from 18:00 to 22:00 UTC.
EXPECTED_KPI_TEAM = {
    "closed": 3,
    "resolved": 3,
    "staffed_hours": 6.0,  # k-1 18:00-22:00, k-2 18:00-20:00
    "closed_per_staffed_hour": 0.5,
    "cost_per_resolved_contact": 60.0,  # 30/h x 6 h / 3
    "messages": 9,
    "turns": 7,
    "repeat_contacts": 1,
    "first_response_seconds_avg": 160.0,  # (300 + 120 + 60) / 3
    "resolution_seconds_avg": 900.0,  # (1500 + 600 + 600) / 3
    "routed": 4,  # C1, C2, C3 at home; C4 (a kpi customer) overflowed after hours
    "csat_responses": 2,
    "csat_average": 4.0,
}
EXPECTED_STANDARD = {"closed": 1, "resolved": 1, "staffed_hours": 4.0, "closed_per_staffed_hour": 0.25, "cost_per_resolved_contact": 100.0, "messages": 2, "turns": 2}


@dataclass
class Day(System):
    metrics_http: httpx.AsyncClient | None = None

    async def presence(self, agent: str, presence: Presence, at: datetime) -> None:
        await self.probe.send("agent.presence.v1", agent, AgentPresenceChanged(agent_id=agent, presence=presence, changed_at=at), time=at)

    async def lines(self, customer: str, n: int) -> None:
        await self.events(customer, "MessageAdded", count=n)

    async def reply(self, customer: str, conv: str, agent: str, at: datetime) -> None:
        await self.probe.send("agent.actions.v1", customer, ReplyToCustomer(action_id=f"a-{uuid.uuid4().hex}", customer_id=customer, conversation_id=conv, agent_id=agent, text="on it", sent_at=at), time=at)

    async def resolve(self, customer: str, conv: str, agent: str, at: datetime, count: int = 1) -> None:
        await self.probe.send("agent.actions.v1", customer, ResolveConversation(action_id=f"a-{uuid.uuid4().hex}", customer_id=customer, conversation_id=conv, agent_id=agent, resolved_at=at), time=at)
        await self.events(customer, "ConversationResolved", count=count)


async def play_the_day(day: Day) -> dict[str, Any]:
    """The script; returns ids the assertions need."""
    for agent in ("k-1", "k-2", "std-1"):
        await day.presence(agent, Presence.ONLINE, T)

    async def online() -> bool:
        n = 0
        async for pool in day.db["pools"].find({}):
            n += sum(1 for a in expand_document(pool).get("agents", {}).values() if a["presence"] == "online")
        return n == 3

    await eventually(online, what="agents online")
    a, b, c = "+15550000001", "+15550000002", "+15550000003"

    # C1 (customer A): 5 lines in 3 turns; first response after 300 s; resolved after 1500 s.
    await day.customer_message(channel="sms", address=a, at=T + timedelta(minutes=5))
    cust_a = await day.customer_id_of(a)
    c1 = (await day.events(cust_a, "ConversationAssigned"))[0]["data"]
    await day.customer_message(channel="sms", address=a, at=T + timedelta(minutes=6))
    await day.lines(cust_a, 2)
    await day.reply(cust_a, c1["conversation_id"], c1["agent_id"], T + timedelta(minutes=10))
    await day.lines(cust_a, 3)
    await day.reply(cust_a, c1["conversation_id"], c1["agent_id"], T + timedelta(minutes=11))
    await day.lines(cust_a, 4)
    await day.customer_message(channel="sms", address=a, at=T + timedelta(minutes=20))
    await day.lines(cust_a, 5)
    await day.resolve(cust_a, c1["conversation_id"], c1["agent_id"], T + timedelta(minutes=30))

    # C2 (customer B): first response 120 s, resolved after 600 s.
    await day.customer_message(channel="sms", address=b, at=T + timedelta(hours=1))
    cust_b = await day.customer_id_of(b)
    c2 = (await day.events(cust_b, "ConversationAssigned"))[0]["data"]
    await day.reply(cust_b, c2["conversation_id"], c2["agent_id"], T + timedelta(hours=1, minutes=2))
    await day.lines(cust_b, 2)
    await day.resolve(cust_b, c2["conversation_id"], c2["agent_id"], T + timedelta(hours=1, minutes=10))

    # C3 (customer A again, within 7 days of C1's resolution: a repeat contact).
    await day.customer_message(channel="sms", address=a, at=T + timedelta(hours=1, minutes=30))
    c3 = (await day.events(cust_a, "ConversationAssigned", count=2))[-1]["data"]
    await day.reply(cust_a, c3["conversation_id"], c3["agent_id"], T + timedelta(hours=1, minutes=31))
    await day.lines(cust_a, 7)
    await day.resolve(cust_a, c3["conversation_id"], c3["agent_id"], T + timedelta(hours=1, minutes=40), count=2)

    # C4 (customer C) after the team closed at 20:30: the standard pool.
    await day.customer_message(channel="sms", address=c, at=T + timedelta(hours=3))
    cust_c = await day.customer_id_of(c)
    c4 = (await day.events(cust_c, "ConversationAssigned"))[0]["data"]
    assert (c4["pool"], c4["pool_reason"], c4["agent_id"]) == ("standard", "after_hours", "std-1")
    await day.reply(cust_c, c4["conversation_id"], "std-1", T + timedelta(hours=3, minutes=5))
    await day.lines(cust_c, 2)
    await day.resolve(cust_c, c4["conversation_id"], "std-1", T + timedelta(hours=3, minutes=10))

    # CSAT: 5 for C1, 3 for C2.
    for n, (customer, conv, score) in enumerate(((cust_a, c1["conversation_id"], 5), (cust_b, c2["conversation_id"], 3))):
        await day.probe.send("surveys.responses.v1", customer, SurveyAnswered(survey_id=f"s-{n}-{uuid.uuid4().hex[:6]}", customer_id=customer, conversation_id=conv, score=score, answered_at=T + timedelta(hours=2, minutes=n)))

    await day.presence("k-2", Presence.OFFLINE, T + timedelta(hours=2))
    await day.presence("k-1", Presence.OFFLINE, T + timedelta(hours=4))
    await day.presence("std-1", Presence.OFFLINE, T + timedelta(hours=4))
    return {"customers": (cust_a, cust_b, cust_c)}


@pytest.fixture
async def day(infra, tmp_path) -> AsyncIterator[Day]:
    async with AsyncExitStack() as stack:
        r = await isolated_run(stack, infra, "m", "kpis", TEAMS, tmp_path)
        prefix, db_name, config, probe = r.prefix, r.db_name, r.config, r.probe
        ingest_http = await stack.enter_async_context(running(ingest(service_settings(IngestSettings, infra, prefix, db_name))))
        await stack.enter_async_context(running(team_routing(service_settings(TeamRoutingSettings, infra, prefix, db_name, teams_config=config))))
        state_http = await stack.enter_async_context(running(conversation_state(service_settings(ConversationStateSettings, infra, prefix, db_name, teams_config=config, reopen_window_minutes=30))))
        client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True)
        stack.push_async_callback(client.close)
        stack.push_async_callback(client.drop_database, db_name)
        d = Day(probe, client[db_name], ingest_http, state_http, prefix)
        d.metrics_settings = service_settings(  # type: ignore[attr-defined]
            MetricsSettings, infra, prefix, db_name, teams_config=config, staffed_time_interval_s=0, consumer_lag_interval_s=0
        )
        d.stack = stack  # type: ignore[attr-defined]
        yield d


def metrics_service(day: Day) -> Any:
    return metrics(day.metrics_settings, clock=lambda: T + timedelta(hours=5))  # type: ignore[attr-defined]


async def kpis_when_settled(http: httpx.AsyncClient) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        body = (await http.get("/kpis", params={"from": T.isoformat(), "to": (T + timedelta(hours=4)).isoformat()})).json()
        kpi = body["kpis"].get("kpi", {})
        standard = body["kpis"].get("standard", {})
        settled = (
            kpi.get("closed") == 3 and kpi.get("staffed_hours") == 6.0 and kpi.get("csat_responses") == 2 and standard.get("staffed_hours") == 4.0
        )
        return body if settled else None

    return await eventually(probe, timeout_s=60, what="KPIs settled")


def assert_ground_truth(body: dict[str, Any]) -> None:
    kpi, standard = body["kpis"]["kpi"], body["kpis"]["standard"]
    for name, expected in EXPECTED_KPI_TEAM.items():
        assert kpi[name] == pytest.approx(expected), f"{name}: {kpi}"
    assert kpi["lines_per_turn"] == pytest.approx(9 / 7)
    assert kpi["repeat_contact_rate"] == pytest.approx(1 / 3)
    assert kpi["overflow"] == {"after_hours": 1, "opt_out": 0, "surge": 0}
    assert kpi["overflow_rate"]["after_hours"] == pytest.approx(0.25)
    for name, expected in EXPECTED_STANDARD.items():
        assert standard[name] == pytest.approx(expected), name
    assert standard["first_response_seconds_avg"] == pytest.approx(300.0)


async def latest_pool_statuses(day: Day) -> dict[str, dict[str, Any]]:
    """The last status team-routing published for each pool (one partition per pool key)."""
    latest: dict[str, dict[str, Any]] = {}
    for record in sorted(await day.probe.records("pools.status.v1"), key=lambda r: (r.partition, r.offset)):
        status = json.loads(record.value)["data"]
        latest[status["pool_id"]] = status
    return latest


async def pools_shown_when_current(day: Day, http: httpx.AsyncClient) -> dict[str, Any]:
    """/kpis shows every pool as its latest status says (stored behind a checkpoint: eventually)."""
    expected = {
        pool: (s["queue_depth"], s["agents_online"], s["capacity_online"], s["load"], s["surging"], datetime.fromisoformat(s["at"]))
        for pool, s in (await latest_pool_statuses(day)).items()
    }
    assert expected, "team-routing published no pool status"

    async def probe() -> dict[str, Any] | None:
        pools = (await http.get("/kpis", params={"from": T.isoformat(), "to": (T + timedelta(hours=4)).isoformat()})).json()["pools"]
        shown = {
            pool: (p["queue_depth"], p["agents_online"], p["capacity_online"], p["load"], p["surging"], datetime.fromisoformat(p["as_of"]))
            for pool, p in pools.items()
        }
        return pools if shown == expected else None

    return await eventually(probe, timeout_s=30, what=f"/kpis pools equal to the latest statuses {expected}")


async def test_a_scripted_day_gives_exactly_the_expected_kpis_and_they_survive_a_restart(day: Day):
    async with running(metrics_service(day)) as http:
        await play_the_day(day)
        body = await kpis_when_settled(http)
        assert_ground_truth(body)
        per_agent = (await http.get("/kpis", params={"from": T.isoformat(), "to": (T + timedelta(hours=4)).isoformat(), "group_by": "agent"})).json()["kpis"]
        assert per_agent["kpi/k-2"]["staffed_hours"] == 2.0 and per_agent["kpi/k-1"]["staffed_hours"] == 4.0
        assert sum(v["closed"] for k, v in per_agent.items() if k.startswith("kpi/")) == 3
        exposed = (await http.get("/metrics")).text
        assert 'hometeam_repeat_contacts_total{team="kpi"} 1.0' in exposed, "\n".join(l for l in exposed.splitlines() if "repeat" in l)
        await pools_shown_when_current(day, http)

    # A restart of the metrics service: the JSON API still shows the same numbers.
    async with running(metrics_service(day)) as http:
        body = (await http.get("/kpis", params={"from": T.isoformat(), "to": (T + timedelta(hours=4)).isoformat()})).json()
        assert_ground_truth(body)
        assert (await http.get("/kpis", params={"from": "yesterday"})).status_code == 400
        await pools_shown_when_current(day, http)


PROMQL_EXPECTED = {
    "team:hometeam_closed_per_staffed_hour:total": 0.5,
    "team:hometeam_cost_per_resolved_contact:total": 60.0,
    "team:hometeam_lines_per_turn:total": 9 / 7,
    "team:hometeam_repeat_contact_rate:total": 1 / 3,
    "team:hometeam_overflow_rate:total": 0.25,
    "team:hometeam_csat_average:total": 4.0,
    "team:hometeam_first_response_seconds_avg:total": 160.0,
    "team:hometeam_resolution_seconds_avg:total": 900.0,
}


async def test_a_real_prometheus_scraping_the_metrics_service_computes_the_same_kpis(day: Day, tmp_path):
    """Debian's Prometheus server scrapes the metrics service and evaluates the project's own
    recording rules; PromQL gives the scenario's ground truth."""
    import asyncio
    import shutil
    import subprocess

    from tests.support import free_port, serving

    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is missing: run scripts/prometheus_tools.sh (make test does)"
    rules = yaml.safe_load(Path("deploy/prometheus/rules/kpis.yml").read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"  # the project's rules, evaluated every second for the test
    (tmp_path / "kpis.yml").write_text(yaml.safe_dump(rules))

    async with serving(metrics_service(day)) as metrics_port:
        web = free_port()
        (tmp_path / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(tmp_path / "kpis.yml")],
                    "scrape_configs": [{"job_name": "metrics", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
                }
            )
        )
        server = subprocess.Popen(
            [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{web}"],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("wb"),
        )
        try:
            await play_the_day(day)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{web}") as api:

                async def value(query: str, team: str = "kpi") -> float | None:
                    try:
                        body = (await api.get("/api/v1/query", params={"query": query})).json()
                    except httpx.HTTPError:
                        return None
                    for series in body.get("data", {}).get("result", []):
                        if series["metric"].get("team") == team:
                            return float(series["value"][1])
                    return None

                async def settled() -> bool:
                    return (
                        await value('sum by (team) (hometeam_conversations_closed_total)') == 3
                        and await value('sum by (team) (hometeam_staffed_agent_seconds_total)') == 6 * 3600
                        and await value('sum by (team) (hometeam_csat_responses_total)') == 2
                        and await value("team:hometeam_csat_average:total") is not None
                    )

                await eventually(settled, timeout_s=90, what="Prometheus to scrape the scenario and evaluate the rules")
                await asyncio.sleep(2)  # one more evaluation round on the settled counters
                async with httpx.AsyncClient() as debug:
                    exposed_now = (await debug.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
                for query, expected in PROMQL_EXPECTED.items():
                    assert await value(query) == pytest.approx(expected), query + "\n" + "\n".join(l for l in exposed_now.splitlines() if "repeat" in l)
                assert await value("team:hometeam_closed_per_staffed_hour:total", team="standard") == pytest.approx(0.25)
                assert await value('sum by (team) (hometeam_overflow_total{reason="after_hours"})') == 1
        finally:
            server.terminate()
            server.wait(timeout=30)

        # promtool lints what the service exposes.
        promtool = shutil.which("promtool")
        assert promtool, "promtool is missing: run scripts/prometheus_tools.sh"
        async with httpx.AsyncClient() as client:
            exposed = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        lint = subprocess.run([promtool, "check", "metrics"], input=exposed, capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr
