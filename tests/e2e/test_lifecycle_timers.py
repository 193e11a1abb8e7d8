"""Lifecycle timers end to end on the real broker and store, with the sweeper on an injected
clock: inactivity closes, response targets, team hours, callbacks across replicas, surges."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from pymongo import AsyncMongoClient

from services.conversation_state.app import ConversationStateSettings
from services.conversation_state.app import create_service as conversation_state
from services.ingest.app import IngestSettings
from services.ingest.app import create_service as ingest
from services.team_routing.app import TeamRoutingSettings
from services.team_routing.app import create_service as team_routing
from services.timeout_sweeper.app import TimeoutSweeperSettings
from services.timeout_sweeper.app import create_service as timeout_sweeper
from shared.contracts.agents import AgentPresenceChanged, Presence, ReplyToCustomer, ResolveConversation
from shared.contracts.customers import ScheduleCallback
from shared.runtime.compact import expand_document
from tests.e2e.conftest import DAY, EVERY_DAY, System
from tests.support import eventually, isolated_run, running, service_settings

TEAMS = {
    "default_team": "east",
    "capacity": {"waiting_on_agent_weight": 1.0, "waiting_on_customer_weight": 0.5},
    # The standard pool's agent stays offline unless a test signs them in, so overflowed
    # conversations wait there (and can come home).
    "standard_pool": {"agents": [{"id": "std-1", "max_concurrency": 10}]},
    "teams": [
        {
            "id": "east",
            "name": "New York",
            "timezone": "America/New_York",
            "regions": {"area_codes": ["212"]},
            "hours": EVERY_DAY,
            "response_target_seconds": 300,
            "surge": {"max_queue_depth": 2, "max_oldest_wait_seconds": 86400},
            "agents": [{"id": "e-1", "max_concurrency": 1}, {"id": "e-2", "max_concurrency": 1}],
        },
        {
            "id": "tiny",
            "name": "Tiny",
            "timezone": "America/New_York",
            "regions": {"zip_prefixes": ["999"]},
            "hours": EVERY_DAY,
            "response_target_seconds": 3600,
            "agents": [{"id": "t-1", "max_concurrency": 1}],
        },
    ],
}


@dataclass
class FakeClock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Timers(System):
    clock: FakeClock = field(default_factory=lambda: FakeClock(DAY))
    sweepers: list[Any] = field(default_factory=list)
    stack: AsyncExitStack | None = None
    infra: Any = None
    config: Path | None = None
    db_name: str = ""

    async def start_sweeper(self, name: str, **extra: Any) -> Any:
        assert self.stack is not None
        settings = service_settings(
            TimeoutSweeperSettings, self.infra, self.prefix, self.db_name,
            teams_config=self.config, sweep_interval_s=0.05, claim_lease_s=5, service_instance=name, **extra,
        )
        service = timeout_sweeper(settings, clock=self.clock)
        context = running(service)
        await context.__aenter__()
        self.sweepers.append((service, context))
        return service

    async def stop_sweeper(self, service: Any) -> None:
        for entry in list(self.sweepers):
            if entry[0] is service:
                await entry[1].__aexit__(None, None, None)
                self.sweepers.remove(entry)

    async def agent_online(self, agent: str) -> None:
        await self.probe.send("agent.presence.v1", agent, AgentPresenceChanged(agent_id=agent, presence=Presence.ONLINE, changed_at=DAY - timedelta(hours=1)))

    async def reply(self, customer: str, conversation: str, agent: str, at: datetime) -> None:
        await self.probe.send("agent.actions.v1", customer, ReplyToCustomer(action_id=f"a-{uuid.uuid4().hex}", customer_id=customer, conversation_id=conversation, agent_id=agent, text="ok", sent_at=at), time=at)


@pytest.fixture
async def timers(infra, tmp_path) -> AsyncIterator[Timers]:
    async with AsyncExitStack() as stack:
        r = await isolated_run(stack, infra, "s", "timers", TEAMS, tmp_path)
        prefix, db_name, config, probe = r.prefix, r.db_name, r.config, r.probe
        ingest_http = await stack.enter_async_context(running(ingest(service_settings(IngestSettings, infra, prefix, db_name))))
        await stack.enter_async_context(running(team_routing(service_settings(TeamRoutingSettings, infra, prefix, db_name, teams_config=config))))
        state_http = await stack.enter_async_context(
            running(conversation_state(service_settings(ConversationStateSettings, infra, prefix, db_name, teams_config=config,
                                                        inactivity_default_s=3600, inactivity_min_s=600, inactivity_max_s=86400)))
        )
        client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True)
        stack.push_async_callback(client.close)
        stack.push_async_callback(client.drop_database, db_name)
        system = Timers(probe, client[db_name], ingest_http, state_http, prefix, stack=stack, infra=infra, config=config, db_name=db_name)

        async def stop_sweepers() -> None:
            for _, context in list(system.sweepers):
                await context.__aexit__(None, None, None)

        stack.push_async_callback(stop_sweepers)
        for agent in ("e-1", "e-2", "t-1"):
            await system.agent_online(agent)

        async def online() -> bool:
            n = 0
            async for pool in system.db["pools"].find({}):
                n += sum(1 for a in expand_document(pool).get("agents", {}).values() if a["presence"] == "online")
            return n == 3

        await eventually(online, what="agents online")
        yield system


async def first_assignment(system: Timers, address: str, at: datetime, **extra: Any) -> tuple[str, dict]:
    await system.customer_message(channel=extra.pop("channel", "sms"), address=address, at=at, **extra)
    customer = await system.customer_id_of(address)
    return customer, (await system.events(customer, "ConversationAssigned"))[0]["data"]


async def test_inactivity_close_frees_capacity_and_the_queue_moves(timers: Timers):
    await timers.start_sweeper("sweeper-a")
    x, assigned = await first_assignment(timers, "acct-x", DAY, channel="app", authenticated=True, region={"zip": "99901"})
    assert assigned["agent_id"] == "t-1"
    await timers.reply(x, assigned["conversation_id"], "t-1", DAY + timedelta(minutes=1))
    waiting = await timers.probe.wait_for("conversations.events.v1", lambda e: e["subject"] == x and e["type"] == "hometeam.ConversationStatusChanged" and e["data"]["status"] == "waiting_on_customer")
    deadline = datetime.fromisoformat(waiting[0]["data"]["inactive_after"])
    assert deadline == DAY + timedelta(minutes=1) + timedelta(hours=1)  # no reply history yet: the default

    # A second customer needs a full slot; t-1 holds half a slot (waiting on the customer).
    await timers.customer_message(channel="app", address="acct-y", at=DAY + timedelta(minutes=2), authenticated=True, region={"zip": "99902"})
    y = await timers.customer_id_of("acct-y")
    await timers.events(y, "ConversationQueued")

    timers.clock.now = deadline + timedelta(seconds=1)
    closed = (await timers.events(x, "ConversationClosed"))[0]["data"]
    assert (closed["status"], closed["conversation_id"]) == ("closed_inactive", assigned["conversation_id"])
    later = (await timers.events(y, "ConversationAssigned"))[0]["data"]
    assert later["agent_id"] == "t-1"
    queue = await timers.read_when("/teams/tiny/queue", lambda b: not b["waiting"] and [c["customer_id"] for c in b["assigned"].get("t-1", [])] == [y])
    assert queue["waiting"] == [] and [c["customer_id"] for c in queue["assigned"]["t-1"]] == [y]


async def reply_history(timers: Timers, customer: str, conversation: str, agent: str, address: str, start: datetime, gap: timedelta) -> datetime:
    """Three exchanges where the customer answers after ``gap``; returns the last reply time."""
    at = start
    lines = 1
    for n in range(3):
        # Each step waits for the one before: replies and messages travel different topics.
        at += timedelta(minutes=1)
        await timers.reply(customer, conversation, agent, at)
        lines += 1
        await timers.events(customer, "MessageAdded", count=lines)
        at += gap
        await timers.customer_message(channel="sms", address=address, at=at, text=f"answer {n}")
        lines += 1
        await timers.events(customer, "MessageAdded", count=lines)
    at += timedelta(minutes=1)
    await timers.reply(customer, conversation, agent, at)
    return at


async def test_a_slow_replier_gets_a_longer_timeout_than_a_fast_one(timers: Timers):
    fast_address, slow_address = "+12125550001", "+12125550002"
    fast, fast_conv = await first_assignment(timers, fast_address, DAY)
    slow, slow_conv = await first_assignment(timers, slow_address, DAY)
    fast_last = await reply_history(timers, fast, fast_conv["conversation_id"], fast_conv["agent_id"], fast_address, DAY, timedelta(minutes=2))
    slow_last = await reply_history(timers, slow, slow_conv["conversation_id"], slow_conv["agent_id"], slow_address, DAY, timedelta(hours=3))

    async def deadline_of(customer: str, count: int) -> datetime:
        found = await timers.probe.wait_for("conversations.events.v1", lambda e: e["subject"] == customer and e["type"] == "hometeam.ConversationStatusChanged" and e["data"]["inactive_after"] is not None, count=count)
        return datetime.fromisoformat(found[-1]["data"]["inactive_after"])

    fast_timeout = await deadline_of(fast, 4) - fast_last
    slow_timeout = await deadline_of(slow, 4) - slow_last
    assert fast_timeout == timedelta(minutes=10)  # 3 x 2 min = 6 min, clamped up to the 10-minute minimum
    assert slow_timeout == timedelta(hours=9)  # 3 x 3 h
    assert slow_timeout > fast_timeout

    # At a time past the fast customer's deadline only the fast conversation closes.
    await timers.start_sweeper("sweeper-a")
    timers.clock.now = fast_last + fast_timeout + timedelta(seconds=1)
    await timers.events(fast, "ConversationClosed")
    # The read API of conversation-state (the owner: its memory, not the store written behind).
    conv = await timers.read_when(f"/conversations/{slow_conv['conversation_id']}", lambda b: True)
    assert conv["status"] == "waiting_on_customer"


async def test_a_missed_response_target_moves_the_conversation_to_a_teammate(timers: Timers):
    await timers.start_sweeper("sweeper-a")
    customer, assigned = await first_assignment(timers, "+12125550003", DAY)
    first_agent = assigned["agent_id"]
    timers.clock.now = DAY + timedelta(seconds=301)
    moved = (await timers.events(customer, "ConversationAssigned", count=2))[-1]["data"]
    assert moved["reason"] == "response_target_missed"
    assert moved["team_id"] == "east" and moved["agent_id"] != first_agent


async def test_team_closing_and_opening_move_waiting_conversations_out_and_back(timers: Timers):
    await timers.start_sweeper("sweeper-a")
    # Fill both east agents, then a third customer waits in the east queue.
    for n in range(2):
        await first_assignment(timers, f"+1212555010{n}", DAY + timedelta(seconds=n))
    await timers.customer_message(channel="sms", address="+12125550199", at=DAY + timedelta(seconds=5))
    waiting = await timers.customer_id_of("+12125550199")
    await timers.events(waiting, "ConversationQueued")

    closing = datetime(2026, 11, 24, 1, 0, tzinfo=DAY.tzinfo)  # 20:00 in New York
    timers.clock.now = closing + timedelta(seconds=1)
    moved_out = (await timers.events(waiting, "ConversationQueued", count=2))[-1]["data"]
    assert (moved_out["pool"], moved_out["team_id"], moved_out["pool_reason"]) == ("standard", "standard", "after_hours")

    opening = datetime(2026, 11, 24, 13, 0, tzinfo=DAY.tzinfo)  # 08:00 in New York
    timers.clock.now = opening + timedelta(seconds=1)
    back = (await timers.events(waiting, "ConversationQueued", count=3))[-1]["data"]
    assert (back["pool"], back["team_id"], back["pool_reason"]) == ("home_team", "east", "returned_home")


async def test_a_callback_fires_once_with_two_sweepers_and_a_restart(timers: Timers):
    customer, assigned = await first_assignment(timers, "+12125550004", DAY)
    await timers.probe.send("agent.actions.v1", customer, ResolveConversation(action_id=f"a-{uuid.uuid4().hex}", customer_id=customer, conversation_id=assigned["conversation_id"], agent_id=assigned["agent_id"], resolved_at=DAY + timedelta(minutes=1)))
    await timers.events(customer, "ConversationResolved")
    due = DAY + timedelta(hours=2)
    await timers.probe.send("customers.commands.v1", customer, ScheduleCallback(command_id=f"c-{uuid.uuid4().hex}", customer_id=customer, callback_at=due, requested_at=DAY + timedelta(minutes=2)))
    await timers.events(customer, "CallbackScheduled")

    first = await timers.start_sweeper("sweeper-a")
    await timers.start_sweeper("sweeper-b")

    async def armed() -> bool:
        return await timers.db["deadlines"].count_documents({"kind": "callback"}) == 1

    await eventually(armed, what="callback deadline armed")
    await timers.stop_sweeper(first)  # a restart in between
    await timers.start_sweeper("sweeper-a")
    timers.clock.now = due + timedelta(seconds=1)

    opened = await timers.events(customer, "ConversationOpened", count=2)
    commands = [e for e in await timers.probe.envelopes("lifecycle.commands.v1") if e["type"] == "hometeam.StartCallback"]
    assert len({e["id"] for e in commands}) == 1
    routes = [e for e in await timers.probe.envelopes("routing.commands.v1") if e["type"] == "hometeam.RouteConversation" and e["data"]["conversation_id"] == opened[-1]["data"]["conversation_id"]]
    assert routes and routes[0]["data"]["priority"] == 5
    timers.clock.now = due + timedelta(minutes=10)
    await eventually(lambda: _no_callbacks(timers), what="callback deadline removed")
    conversations = [e for e in await timers.probe.envelopes("conversations.events.v1") if e["subject"] == customer and e["type"] == "hometeam.ConversationOpened"]
    assert len({e["data"]["conversation_id"] for e in conversations}) == 2


async def test_a_rebalance_makes_a_sweeper_read_what_falls_due_again(timers: Timers):
    """A deadline armed by a replica that then left, due inside another's read window, was in
    the leaver's memory only: the group's rebalance makes the others read, so it fires now,
    not when their window ends (an hour here)."""
    customer, _ = await first_assignment(timers, "+12125550011", DAY)
    hour = {"sweep_read_ahead_s": 3600, "sweep_read_ahead_max_s": 3600}
    service = await timers.start_sweeper("sweeper-a", **hour)
    sweeper = service.extras["sweeper"]

    async def settled() -> bool:
        # Read, assigned its partitions, and the read that assignment asked for done.
        assigned = any(sub.consumer is not None and sub.consumer.assignment() for sub in service.broker.subscribers)
        return sweeper.ahead.covered_until is not None and assigned and not sweeper.ahead.requested

    await eventually(settled, what="sweeper-a assigned and read")
    await asyncio.sleep(0.2)  # (a few sweeps: one reading when the request came is done too)
    callback_id = f"cb-{uuid.uuid4().hex}"
    due = timers.clock.now + timedelta(minutes=5)
    await timers.db["deadlines"].insert_one(
        {"_id": f"callback:{callback_id}@000000000001", "kind": "callback", "entity": callback_id, "due_at": due,
         "data": {"customer_id": customer}, "armed_at": timers.clock.now}
    )
    timers.clock.now = due + timedelta(seconds=1)

    async def fired() -> list[dict]:
        return [e for e in await timers.probe.envelopes("lifecycle.commands.v1")
                if e["type"] == "hometeam.StartCallback" and e["data"]["callback_id"] == callback_id]

    await asyncio.sleep(0.5)  # ten sweeps: inside its hour's window sweeper-a does not read it
    assert await fired() == []
    # Another member joins the sweepers' consumer group: sweeper-a is assigned partitions again.
    joiner = AIOKafkaConsumer(
        timers.prefix + "conversations.events.v1", bootstrap_servers=timers.infra.kafka,
        group_id=service.runtime.settings.group_id, enable_auto_commit=False,
        partition_assignment_strategy=(RangePartitionAssignor,),  # as the services' consumers
    )
    try:
        await joiner.start()
        assert len(await eventually(fired, what="the callback fired after the rebalance")) == 1
    finally:
        await joiner.stop()


async def _no_callbacks(timers: Timers) -> bool:
    return await timers.db["deadlines"].count_documents({"kind": "callback"}) == 0


async def test_a_surge_overflows_to_the_standard_pool_and_recovers(timers: Timers):
    for n in range(2):
        await first_assignment(timers, f"+1212555020{n}", DAY + timedelta(seconds=n))
    queued = []
    for n in range(2):
        address = f"+1212555021{n}"
        await timers.customer_message(channel="sms", address=address, at=DAY + timedelta(seconds=10 + n))
        queued.append(await timers.customer_id_of(address))
        await timers.events(queued[-1], "ConversationQueued")
    # The east queue is at its surge threshold (2): the next new customer overflows.
    await timers.customer_message(channel="sms", address="+12125550299", at=DAY + timedelta(seconds=20))
    overflowed = await timers.customer_id_of("+12125550299")
    surge = (await timers.events(overflowed, "ConversationQueued"))[0]["data"]
    assert (surge["pool"], surge["pool_reason"]) == ("standard", "surge")

    # An agent frees up: the queue drops below the threshold and the overflow comes home.
    holder = await eventually(lambda: timers.db["conversations"].find_one({"team_id": "east", "agent_id": "e-1"}), what="e-1's conversation stored")
    await timers.probe.send("agent.actions.v1", holder["customer_id"], ResolveConversation(action_id=f"a-{uuid.uuid4().hex}", customer_id=holder["customer_id"], conversation_id=holder["_id"], agent_id="e-1", resolved_at=DAY + timedelta(minutes=5)))
    back = (await timers.events(overflowed, "ConversationQueued", count=2))[-1]["data"]
    assert (back["pool"], back["team_id"], back["pool_reason"]) == ("home_team", "east", "returned_home")
