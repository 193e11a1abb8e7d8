"""Runs ingest, team-routing and conversation-state in-process against the real broker and
store, on topics and a database of their own, with a small team directory made for the
scenarios (two regional teams in different time zones, a tiny team to fill up, the pool)."""

from __future__ import annotations

import uuid
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
from services.ingest.normalize import address_key
from services.team_routing.app import TeamRoutingSettings
from services.team_routing.app import create_service as team_routing
from shared.contracts.agents import AgentPresenceChanged, Presence
from shared.contracts.channel import ChannelMessagePosted
from shared.runtime.compact import expand_document
from tests.support import KafkaProbe, eventually, isolated_run, running, service_settings

EVERY_DAY = {d: ["08:00-20:00"] for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}

TEAMS = {
    "relationship_window_days": 30,
    "default_team": "chi",
    "capacity": {"waiting_on_agent_weight": 1.0, "waiting_on_customer_weight": 0.5},
    "standard_pool": {"agents": [{"id": "std-1", "max_concurrency": 50}]},
    "teams": [
        {
            "id": "pnw",
            "name": "Seattle",
            "timezone": "America/Los_Angeles",
            "regions": {"area_codes": ["206"], "zip_prefixes": ["981"]},
            "hours": EVERY_DAY,
            "agents": [{"id": "sea-ana", "max_concurrency": 20}, {"id": "sea-ben", "max_concurrency": 20}],
        },
        {
            "id": "chi",
            "name": "Chicago",
            "timezone": "America/Chicago",
            "regions": {"markets": ["chicago"], "area_codes": ["312"]},
            "hours": EVERY_DAY,
            "agents": [{"id": "chi-eve", "max_concurrency": 20}],
        },
        {
            "id": "tiny",
            "name": "Tiny",
            "timezone": "America/New_York",
            "regions": {"zip_prefixes": ["999"]},
            "hours": EVERY_DAY,
            "surge": {"max_queue_depth": 50, "max_oldest_wait_seconds": 86400},
            "agents": [{"id": "tiny-1", "max_concurrency": 1}],
        },
    ],
}
AGENTS = ["sea-ana", "sea-ben", "chi-eve", "tiny-1", "std-1"]

# Monday 23 Nov 2026, 10:00 in Seattle, 12:00 in Chicago: every team is open.
DAY = datetime(2026, 11, 23, 18, 0, tzinfo=UTC)
# 22:00 in Seattle, 00:00 in Chicago: every team is closed.
NIGHT = datetime(2026, 11, 24, 6, 0, tzinfo=UTC)


@dataclass
class System:
    probe: KafkaProbe
    db: Any
    ingest_http: httpx.AsyncClient
    state_http: httpx.AsyncClient
    prefix: str

    async def customer_message(
        self,
        *,
        channel: str,
        address: str,
        at: datetime,
        text: str = "hello",
        provider_id: str | None = None,
        **extra: Any,
    ) -> str:
        provider_id = provider_id or f"P{uuid.uuid4().hex}"
        msg = ChannelMessagePosted.model_validate(
            {"channel": channel, "provider_message_id": provider_id, "address": address, "text": text, "sent_at": at, **extra}
        )
        await self.probe.send("channel.inbound.v1", address_key(channel, address), msg, time=at)
        return provider_id

    async def customer_id_of(self, address: str) -> str:
        found = await self.probe.wait_for("messages.received.v1", lambda e: e["data"]["address"] == address)
        return found[0]["data"]["customer_id"]

    async def read_when(self, path: str, ready: Any, timeout_s: float = 30.0) -> dict[str, Any]:
        """GET a read-API path until it answers and ``ready(body)`` holds: events go out
        before the store write, so the read API can lag an event by a batch (and answer 404
        for a conversation not stored yet)."""

        async def probe() -> dict[str, Any] | None:
            response = await self.state_http.get(path)
            if response.status_code == 404:
                return None  # not stored yet
            body = response.json()
            return body if ready(body) else None

        return await eventually(probe, timeout_s, f"{path} to catch up")

    async def events(self, customer_id: str, type_name: str, count: int = 1) -> list[dict[str, Any]]:
        return await self.probe.wait_for(
            "conversations.events.v1",
            lambda e: e["subject"] == customer_id and e["type"] == f"hometeam.{type_name}",
            count=count,
        )


@pytest.fixture(scope="module")
async def system(infra, tmp_path_factory) -> AsyncIterator[System]:
    async with AsyncExitStack() as stack:
        r = await isolated_run(stack, infra, "e", "e2e", TEAMS, Path(tmp_path_factory.mktemp("teams")))
        prefix, db_name, config, probe = r.prefix, r.db_name, r.config, r.probe
        common = {"teams_config": config}
        ingest_http = await stack.enter_async_context(
            running(
                ingest(
                    service_settings(
                        IngestSettings,
                        infra,
                        prefix,
                        db_name,
                        twilio_auth_token="test-token",
                        business_chat_jwt_secret="test-chat-secret-0123456789abcdef",
                        app_jwt_secret="test-app-secret-0123456789abcdef0",
                    )
                )
            )
        )
        await stack.enter_async_context(running(team_routing(service_settings(TeamRoutingSettings, infra, prefix, db_name, **common))))
        state_http = await stack.enter_async_context(
            running(
                conversation_state(
                    service_settings(ConversationStateSettings, infra, prefix, db_name, reopen_window_minutes=30, **common)
                )
            )
        )
        client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True)
        stack.push_async_callback(client.close)
        db = client[db_name]
        stack.push_async_callback(client.drop_database, db_name)

        for agent in AGENTS:
            await probe.send(
                "agent.presence.v1",
                agent,
                AgentPresenceChanged(agent_id=agent, presence=Presence.ONLINE, changed_at=DAY.replace(hour=0)),
            )

        async def all_online() -> bool:
            online = 0
            async for pool in db["pools"].find({}):
                online += sum(1 for a in expand_document(pool).get("agents", {}).values() if a["presence"] == "online")
            return online == len(AGENTS)

        await eventually(all_online, timeout_s=60, what="every agent online in team-routing")
        yield System(probe, db, ingest_http, state_http, prefix)
