"""The demo simulator against real services: ingest, team-routing, conversation-state and
metrics run in-process on the real broker and store (topics and a database of this test's
own), the simulator plays ~15 s through the signed webhooks and ``channel.inbound.v1``, and the
live view's snapshot of the result shows teams, routing and KPIs, without personal data."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient

from services.conversation_state.app import ConversationStateSettings
from services.conversation_state.app import create_service as conversation_state
from services.ingest.app import IngestSettings
from services.ingest.app import create_service as ingest
from services.metrics.app import MetricsSettings
from services.metrics.app import create_service as metrics
from services.team_routing.app import TeamRoutingSettings
from services.team_routing.app import create_service as team_routing
from shared.teams import WEEKDAYS, parse_directory
from tests.support import KafkaProbe, eventually, isolated_run, running, service_settings
from tools.live import EventFeed, collect, render
from tools.simulator.channels import Secrets
from tools.simulator.runner import Simulator
from tools.simulator.script import AGENT_TEXTS, FIRST_TEXTS, FOLLOW_UP_TEXTS, MORE_TEXTS, RETURNING_TEXTS, build_script

BASE = "http://hometeam.test"
SECRETS = Secrets(
    twilio_auth_token="sim-live-twilio-token",
    business_chat_secret="sim-live-business-chat-secret-0123456789",
    business_chat_audience="hometeam-business-chat",
    app_secret="sim-live-app-secret-0123456789abcdef",
    app_audience="hometeam-app",
    public_base_url=BASE,
)
# One team that is always open and one that never is (its customers overflow after hours).
TEAMS: dict[str, Any] = {
    "relationship_window_days": 30,
    "default_team": "open",
    "standard_pool": {"agents": [{"id": "simt-std-1", "max_concurrency": 20}]},
    "teams": [
        {
            "id": "open",
            "name": "Always open",
            "timezone": "UTC",
            "regions": {"area_codes": ["206"], "zip_prefixes": ["981"], "markets": ["seattle"]},
            "hours": {d: ["00:00-24:00"] for d in WEEKDAYS},
            "agents": [{"id": "simt-open-1", "max_concurrency": 10}, {"id": "simt-open-2", "max_concurrency": 10}],
        },
        {
            "id": "closed",
            "name": "Never open",
            "timezone": "America/Chicago",
            "regions": {"area_codes": ["312"], "zip_prefixes": ["606"], "markets": ["chicago"]},
            "hours": {},
            "agents": [{"id": "simt-closed-1", "max_concurrency": 10}],
        },
    ],
}
RATE, DURATION = 2.0, 15.0


def pick_seed() -> int:
    """A seed whose plan has traffic for both teams and both paths (the plan does not depend on
    the start time here: one team is always open, the other never)."""
    directory = parse_directory(TEAMS)
    for seed in range(1, 200):
        s = build_script(directory, seed=seed, rate=RATE, duration=DURATION, start=datetime.now(UTC))
        whys = {m.why for m in s.messages[:-2]}
        vias = {m.via for m in s.messages}
        if {"new", "after_hours"} <= whys and vias == {"webhook", "topic"}:
            return seed
    raise AssertionError("no seed with traffic for both teams")


@dataclass
class Demo:
    probe: KafkaProbe
    ingest_http: httpx.AsyncClient
    state_http: httpx.AsyncClient
    metrics_http: httpx.AsyncClient
    prefix: str
    config: Path


@pytest.fixture(scope="module")
async def demo(infra, tmp_path_factory) -> AsyncIterator[Demo]:
    async with AsyncExitStack() as stack:
        r = await isolated_run(stack, infra, "sim", "sim", TEAMS, Path(tmp_path_factory.mktemp("simteams")))
        prefix, db_name, config, probe = r.prefix, r.db_name, r.config, r.probe
        common = {"teams_config": config}
        client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url)
        stack.push_async_callback(client.close)
        stack.push_async_callback(client.drop_database, db_name)
        ingest_http = await stack.enter_async_context(
            running(
                ingest(
                    service_settings(
                        IngestSettings,
                        infra,
                        prefix,
                        db_name,
                        public_base_url=BASE,
                        twilio_auth_token=SECRETS.twilio_auth_token,
                        business_chat_jwt_secret=SECRETS.business_chat_secret,
                        app_jwt_secret=SECRETS.app_secret,
                    )
                )
            )
        )
        await stack.enter_async_context(running(team_routing(service_settings(TeamRoutingSettings, infra, prefix, db_name, **common))))
        state_http = await stack.enter_async_context(
            running(conversation_state(service_settings(ConversationStateSettings, infra, prefix, db_name, **common)))
        )
        metrics_http = await stack.enter_async_context(
            running(
                metrics(
                    service_settings(
                        MetricsSettings, infra, prefix, db_name, staffed_time_interval_s=1.0, consumer_lag_interval_s=0, **common
                    )
                )
            )
        )
        yield Demo(probe, ingest_http, state_http, metrics_http, prefix, config)


async def test_the_simulator_drives_the_system_and_the_live_view_shows_it(demo: Demo, infra, tmp_path) -> None:
    directory = parse_directory(TEAMS)
    seed = pick_seed()
    script = build_script(directory, seed=seed, rate=RATE, duration=DURATION, start=datetime.now(UTC))
    status_file = tmp_path / "simulator.json"
    log: list[str] = []
    simulator = Simulator(
        script,
        directory,
        bootstrap=infra.kafka,
        ingest_url=BASE,
        topic_prefix=demo.prefix,
        secrets=SECRETS,
        http=demo.ingest_http,
        status_file=status_file,
        pace=0.5,
        log=log.append,
        summary_every_s=5,
    )
    status = await asyncio.wait_for(simulator.run(), timeout=DURATION + 45)

    counters = status["counters"]
    assert status["phase"] == "finished"
    assert counters.get("webhook_errors", 0) == 0, log
    assert counters.get("errors", 0) == 0, log
    assert counters.get("via_webhook", 0) >= 1 and counters.get("via_topic", 0) >= 1, counters
    assert 5 <= counters["customer_messages"] <= script.budget, counters
    assert counters.get("agent_replies", 0) >= 1, counters

    # Conversations got assigned: home team agents for the open team's customers, the
    # standard pool (after hours) for the closed team's.
    assigned = await demo.probe.wait_for(
        "conversations.events.v1", lambda e: e["type"] == "hometeam.ConversationAssigned", count=3, timeout_s=60
    )
    home = [e["data"] for e in assigned if e["data"]["team_id"] == "open"]
    assert home and all(d["agent_id"].startswith("simt-open-") and d["pool_reason"] == "home_team" for d in home), home
    await demo.probe.wait_for(
        "conversations.events.v1",
        lambda e: e["type"] == "hometeam.ConversationAssigned" and e["data"]["pool"] == "standard" and e["data"]["pool_reason"] == "after_hours",
        timeout_s=60,
    )
    # Resolves come after a few exchanges with human-ish delays: a 15 s run may have none, so
    # a resolve is awaited only when the simulator sent one.
    if counters.get("agent_resolves", 0):
        await demo.probe.wait_for(
            "conversations.events.v1", lambda e: e["type"] == "hometeam.ConversationResolved", timeout_s=60
        )
    customer_ids = {e["data"]["customer_id"] for e in await demo.probe.envelopes("conversations.events.v1")}

    # The live view's snapshot, from the same services and topics.
    feed = EventFeed(infra.kafka, demo.prefix, history=5000)
    await feed.start()
    try:

        async def snapshot_with_kpis():  # type: ignore[no-untyped-def]
            await feed.poll(timeout_ms=200)
            snap = await collect(
                directory,
                metrics=demo.metrics_http,
                state=demo.state_http,
                feed=feed,
                urls={"KPIs (JSON)": f"{BASE}/kpis", "read API": f"{BASE}/teams/open/queue"},
                sim_status=status_file,
            )
            open_kpis = snap.kpis.get("open") or {}
            return snap if snap.recent and open_kpis.get("routed") and not snap.problems else None

        snap = await eventually(snapshot_with_kpis, timeout_s=30, what="KPIs and routing in the live view")
    finally:
        await feed.stop()

    text = render(snap, width=200)
    lines = text.splitlines()

    def section(title: str) -> list[str]:
        start = next(i for i, line in enumerate(lines) if line.startswith(title))
        end = next((i for i in range(start + 1, len(lines)) if not lines[i].strip()), len(lines))
        return lines[start + 1 : end]

    pools = {line.split()[0]: line for line in section("POOL")}
    assert set(pools) == {"open", "closed", "standard"}, text
    assert pools["open"].rstrip().endswith("open") and pools["closed"].rstrip().endswith("closed") and "24/7" in pools["standard"]
    kpis = {line.split()[0]: line for line in section("KPIs per team")[1:]}
    assert "open" in kpis and "standard" in kpis, text
    assert "RECENT ROUTING" in text and "OVERFLOW to the standard pool" in text
    assert re.search(r"after_hours [1-9]", text), text
    assert "simulator finished" in text and f"seed {seed}" in text
    assert "least_loaded" in text

    # No personal data: no phone numbers, addresses or message text; customer ids truncated.
    assert "+1" not in text
    for persona in script.personas.values():
        for address in persona.addresses:
            assert address not in text and address.lstrip("+") not in text
    for line in (*FIRST_TEXTS, *RETURNING_TEXTS, *FOLLOW_UP_TEXTS, *MORE_TEXTS, *AGENT_TEXTS):
        assert line not in text
    for customer_id in customer_ids:
        assert customer_id not in text
    assert json.dumps(status).count("+1") == 0
