"""The demo simulator (``tools/simulator``) and the live view's rendering (``tools/live``),
without Kafka: the plan is deterministic, rate and duration bound the customer messages, every
message it builds is a valid contract payload, and its signed webhook requests pass ingest's
own checks (ingest's webhook routes, called over ASGI)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from services.ingest.normalize import address_key
from services.ingest.webhooks import webhook_routes
from shared.contracts.agents import Presence
from shared.contracts.channel import ChannelMessagePosted
from shared.contracts.common import Channel
from shared.contracts.envelope import RawEnvelope, type_name
from shared.contracts.registry import TOPICS
from shared.teams import home_team_for, is_open, load_directory, parse_directory
from tools.live import EventFeed, PoolRow, Routing, Snapshot, render
from tools.simulator.channels import Secrets, channel_message, inbound_record, webhook_request
from tools.simulator.runner import Budget, Simulator
from tools.simulator.script import (
    AGENT_TEXTS,
    FIRST_TEXTS,
    FOLLOW_UP_TEXTS,
    MessageAction,
    PreferenceAction,
    PresenceAction,
    build_script,
    describe,
)

REPO = Path(__file__).resolve().parents[2]
DIRECTORY = load_directory(REPO / "deploy" / "teams.yaml")
# Monday 23 Nov 2026, 18:30 UTC: the mainland teams and San Juan are open, Guam is closed.
DAY = datetime(2026, 11, 23, 18, 30, tzinfo=UTC)
SECRETS = Secrets(
    twilio_auth_token="sim-test-twilio-token",
    business_chat_secret="sim-test-business-chat-secret-0123456789",
    business_chat_audience="hometeam-business-chat",
    app_secret="sim-test-app-secret-0123456789abcdef",
    app_audience="hometeam-app",
    public_base_url="http://hometeam.test",
)
PAYLOADS = {type_name(p): p for t in TOPICS for p in t.payloads}
TOPIC_OF = {t.name: t for t in TOPICS}


def script(seed: int = 42, rate: float = 3.0, duration: float = 300.0, start: datetime = DAY):  # type: ignore[no-untyped-def]
    return build_script(DIRECTORY, seed=seed, rate=rate, duration=duration, start=start)


# --- the plan --------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_script() -> None:
    a, b = script(seed=42), script(seed=42)
    assert a == b
    assert [describe(x) for x in a.actions] == [describe(x) for x in b.actions]
    assert a.personas == b.personas


def test_another_seed_gives_another_script() -> None:
    assert [describe(x) for x in script(seed=42).actions] != [describe(x) for x in script(seed=43).actions]


@pytest.mark.parametrize(("rate", "duration"), [(3, 300), (0.5, 15), (2, 60), (10, 45), (0.05, 60), (1, 3600)])
def test_rate_and_duration_bound_the_scripted_messages(rate: float, duration: float) -> None:
    s = script(rate=rate, duration=duration)
    assert s.budget == int(rate * duration)
    assert len(s.messages) <= s.budget
    assert all(0 <= a.at <= duration for a in s.actions)
    assert [a.at for a in s.actions] == sorted(a.at for a in s.actions)


def test_budget_reserves_the_script_and_paces_replies() -> None:
    budget = Budget(10, scripted=4, rate=1.0, slack_s=2.0)
    # Replies may use what the script does not need, no faster than the rate (+ slack)...
    assert budget.take(scripted=False, elapsed_s=0.0)
    assert budget.take(scripted=False, elapsed_s=0.0)
    assert not budget.take(scripted=False, elapsed_s=0.0)
    assert all(budget.take(scripted=False, elapsed_s=100.0) for _ in range(4))
    # ... and never the budget reserved for the script.
    assert not budget.take(scripted=False, elapsed_s=100.0)
    assert all(budget.take(scripted=True) for _ in range(4))
    assert not budget.take(scripted=True)
    assert budget.used == 10


class FakeProducer:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, bytes | None]] = []

    async def send_and_wait(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        self.records.append((topic, value, key))


async def test_the_runner_never_sends_more_customer_messages_than_the_budget() -> None:
    s = script(rate=0.5, duration=20)  # budget 10
    sim = Simulator(s, DIRECTORY, bootstrap="unused:9092", ingest_url="http://hometeam.test", secrets=SECRETS)
    sim.producer = FakeProducer()  # type: ignore[assignment]
    sim._t0 -= 1000  # long after the start: the pace allows everything, only the budget counts
    persona = next(iter(s.personas.values()))
    sent = [await sim.send(persona, "hello", "topic", "reply") for _ in range(s.budget + 5)]
    for m in s.messages:
        sent.append(await sim.send(m.persona, m.text, "topic", m.why, scripted=True))
    assert sum(sent) == s.budget
    assert len(sim.producer.records) == s.budget  # type: ignore[attr-defined]
    # Replies got what the script did not reserve; every scripted message still went out.
    assert sim.stats["held_back"] == 5 + len(s.messages)
    assert sum(sent[s.budget + 5 :]) == len(s.messages)


def test_the_script_plays_a_day() -> None:
    """Agents of open teams sign in, closed teams' stay out; every region writes (after-hours
    traffic too); a returning customer, an opt-out customer and a surge are in it."""
    s = script(seed=42, rate=3, duration=300)
    presence = [a for a in s.actions if isinstance(a, PresenceAction)]
    signed_in = {a.agent_id for a in presence if a.presence is Presence.ONLINE and a.why == "shift_start"}
    for team in DIRECTORY.teams:
        ids = {a.id for a in team.agents}
        assert (ids <= signed_in) is is_open(team, DAY), team.id
    assert {a.id for a in DIRECTORY.standard_pool.agents} <= signed_in
    assert {a.why for a in presence} >= {"reset", "shift_start", "break", "signed_out_early", "back"}

    kinds = Counter(m.why for m in s.messages)
    assert kinds["new"] and kinds["after_hours"] and kinds["returning"] and kinds["surge"] and kinds["opt_out"] == 2
    assert {m.persona.channel for m in s.messages} == set(Channel)
    assert {m.via for m in s.messages} == {"webhook", "topic"}
    assert {m.persona.team_id for m in s.messages} == {t.id for t in DIRECTORY.teams}
    for m in s.messages:
        team = DIRECTORY.team(m.persona.team_id)
        assert team is not None
        if m.why == "after_hours":
            assert not is_open(team, DAY + timedelta(seconds=m.at))

    (surge,) = s.surges
    surge_team = DIRECTORY.team(surge.team_id)
    assert surge_team is not None and is_open(surge_team, DAY + timedelta(seconds=surge.start))
    # Big enough to overflow: more customers than the team can hold plus its queue threshold.
    capacity = sum(a.max_concurrency for a in surge_team.agents)
    assert surge.messages > capacity + surge_team.surge.max_queue_depth
    assert surge.end - surge.start <= 30

    prefs = [a for a in s.actions if isinstance(a, PreferenceAction)]
    assert [p.opt_out for p in prefs] == [True, False]
    assert all(p.persona == s.opt_out for p in prefs)
    first, second = [m for m in s.messages if m.why == "opt_out"]
    assert first.at < prefs[0].at < second.at < prefs[1].at


def test_agents_follow_their_team_s_hours_across_a_closing() -> None:
    # San Juan closes at 18:00 local (22:00 UTC): its agents wrap up, then sign out.
    start = datetime(2026, 11, 23, 21, 57, tzinfo=UTC)
    s = script(rate=1, duration=300, start=start)
    team = DIRECTORY.team("caribbean-sanjuan")
    assert team is not None
    closing = 180.0
    for agent in team.agents:
        mine = [a for a in s.actions if isinstance(a, PresenceAction) and a.agent_id == agent.id]
        wrap = [a.at for a in mine if a.why == "wrap_up"]
        out = [a.at for a in mine if a.why == "shift_end"]
        assert wrap and wrap[0] < closing, mine
        assert out and out[0] >= closing, mine
        assert [a.presence for a in mine if a.why in ("wrap_up", "shift_end")] == [Presence.AWAY, Presence.OFFLINE]


def test_personas_belong_to_their_team_and_use_fictional_numbers() -> None:
    s = script()
    assert s.personas
    for p in s.personas.values():
        team, _ = home_team_for(DIRECTORY, channel=p.channel, address=p.address, zip_code=p.zip, market=p.market)
        assert team == p.team_id, p.key
        for phone in (p.address if p.channel is Channel.SMS else None, p.linked_phone):
            if phone:
                assert phone.startswith("+1") and phone[5:8] == "555" and len(phone) == 12, phone


# --- the contracts ---------------------------------------------------------------------------


def test_channel_messages_are_valid_envelopes_for_channel_inbound() -> None:
    s = script()
    for n, m in enumerate(s.messages):
        for by_phone in (False, True):
            message = channel_message(m.persona, m.text, f"P{n}", DAY, by_phone=by_phone)
            key, value = inbound_record(message, DAY)
            envelope = RawEnvelope.model_validate_json(value)
            assert envelope.type in TOPIC_OF["channel.inbound.v1"].type_names
            parsed = ChannelMessagePosted.model_validate(envelope.data)
            assert parsed == message
            assert key.decode() == envelope.subject == address_key(parsed.channel, parsed.address)
            assert parsed.address not in key.decode()


async def test_everything_the_runner_publishes_is_a_registered_payload() -> None:
    """Drive the simulated agents and customers with lifecycle events (no Kafka) and check
    each record against the registry: topic, payload type, key, contract."""
    s = script(rate=3, duration=300)
    sim = Simulator(s, DIRECTORY, bootstrap="unused:9092", ingest_url="http://hometeam.test", secrets=SECRETS, pace=0.001)
    producer = FakeProducer()
    sim.producer = producer  # type: ignore[assignment]
    sim._t0 -= 1000
    for action in s.actions[:40]:
        if isinstance(action, PresenceAction):
            await sim._presence(action)
    from shared.contracts import conversations as ev
    from shared.contracts.messages import CustomerMessageReceived, DeliverMessage

    persona = s.messages[0].persona
    customer, conv = "cus_test0001", "conv-test-1"
    agent = next(a for a, p in sim.presence.items() if p is Presence.ONLINE)
    sim.on_event(
        CustomerMessageReceived(
            message_id="m1", customer_id=customer, channel=persona.channel, address=persona.address,
            provider_message_id="p1", text="hi", sent_at=DAY, received_at=DAY,
        )
    )
    assert sim.customer_of[persona.key] == customer
    sim.on_event(ev.ConversationAssigned(conversation_id=conv, customer_id=customer, pool="home_team", team_id="t",
                                         agent_id=agent, reason="least_loaded", pool_reason="home_team", at=DAY))
    import asyncio

    for _ in range(200):
        await asyncio.sleep(0.01)
        if any(t.endswith("agent.actions.v1") for t, _, _ in producer.records):
            break
    sim.on_event(DeliverMessage(delivery_id="d1", customer_id=customer, conversation_id=conv, channel=persona.channel,
                                address=persona.address, text="reply", agent_id=agent, requested_at=DAY))
    sim.on_event(ev.ConversationResolved(conversation_id=conv, customer_id=customer, team_id="t", agent_id=agent, resolved_at=DAY))
    await asyncio.sleep(0.3)
    sim.stop.set()
    await asyncio.gather(*sim._tasks, return_exceptions=True)

    topics = Counter(t for t, _, _ in producer.records)
    assert topics["agent.presence.v1"] and topics["agent.actions.v1"], topics
    for topic, value, key in producer.records:
        envelope = RawEnvelope.model_validate_json(value)
        spec = TOPIC_OF[topic]
        assert envelope.type in spec.type_names, (topic, envelope.type)
        payload = PAYLOADS[envelope.type].model_validate(envelope.data)
        assert key is not None and key.decode() == envelope.subject
        if spec.key.startswith("customer id"):
            assert envelope.subject == payload.customer_id  # type: ignore[attr-defined]
        if topic == "agent.presence.v1":
            assert envelope.subject == payload.agent_id  # type: ignore[attr-defined]
            assert DIRECTORY.pool_of_agent(payload.agent_id) is not None  # type: ignore[attr-defined]


# --- the signed webhooks, against ingest's own routes -----------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.published: list[ChannelMessagePosted] = []

    async def __call__(self, message: ChannelMessagePosted) -> None:
        self.published.append(message)


async def post_to_ingest(path: str, headers: dict[str, str], content: bytes) -> tuple[httpx.Response, Recorder]:
    recorder = Recorder()
    routes = webhook_routes(
        recorder,
        twilio_auth_token=SECRETS.twilio_auth_token,
        public_base_url=SECRETS.public_base_url,
        business_chat_secret=SECRETS.business_chat_secret,
        business_chat_audience=SECRETS.business_chat_audience,
        app_secret=SECRETS.app_secret,
        app_audience=SECRETS.app_audience,
        max_request_bytes=64 * 1024,
        clock=lambda: DAY,
    )
    transport = httpx.ASGITransport(app=Starlette(routes=routes))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8081") as client:
        response = await client.post(path, headers=headers, content=content)
    return response, recorder


def one_persona_per_channel() -> list[Any]:
    seen: dict[tuple[Channel, bool], Any] = {}
    for p in script().personas.values():
        seen.setdefault((p.channel, p.linked_phone is not None), p)
    assert {c for c, _ in seen} == set(Channel)
    return list(seen.values())


@pytest.mark.parametrize("by_phone", [False, True])
async def test_signed_webhook_requests_pass_ingest_s_checks(by_phone: bool) -> None:
    for persona in one_persona_per_channel():
        request = webhook_request(persona, "my internet is down", "SMsim0001", datetime.now(UTC), SECRETS, by_phone=by_phone)
        response, recorder = await post_to_ingest(request.path, request.headers, request.content)
        assert response.status_code in (200, 202), (persona.channel, response.text)
        (published,) = recorder.published
        expected = channel_message(persona, "my internet is down", "SMsim0001", DAY, by_phone=by_phone)
        for field in ("channel", "address", "text", "provider_message_id", "authenticated", "linked_phone", "region", "business_id"):
            assert getattr(published, field) == getattr(expected, field), (persona.channel, field)
        # The region hint routes them to their own team.
        team, _ = home_team_for(DIRECTORY, channel=published.channel, address=published.address,
                                zip_code=published.region.zip, market=published.region.market)
        assert team == persona.team_id


async def test_tampered_or_wrongly_signed_requests_are_refused() -> None:
    for persona in one_persona_per_channel():
        request = webhook_request(persona, "hello", "SMsim0002", datetime.now(UTC), SECRETS)
        tampered = request.content.replace(b"hello", b"hellO")
        response, recorder = await post_to_ingest(request.path, request.headers, tampered)
        if persona.channel is Channel.SMS:
            assert response.status_code == 403  # the signature covers every parameter
        else:
            assert response.status_code == 202  # a bearer token does not sign the body
        wrong = Secrets(**{**SECRETS.__dict__, "twilio_auth_token": "x", "business_chat_secret": "y" * 32, "app_secret": "z" * 32})
        request = webhook_request(persona, "hello", "SMsim0003", datetime.now(UTC), wrong)
        response, recorder = await post_to_ingest(request.path, request.headers, request.content)
        assert response.status_code == 403 and not recorder.published


def test_secrets_default_to_run_sh_s_local_values_and_the_environment_wins() -> None:
    defaults = Secrets.from_env({})
    run_sh = (REPO / "scripts" / "run.sh").read_text()
    for value in (defaults.twilio_auth_token, defaults.business_chat_secret, defaults.app_secret, defaults.public_base_url):
        assert value in run_sh
    assert Secrets.from_env({"TWILIO_AUTH_TOKEN": "t0"}).twilio_auth_token == "t0"
    for value in (defaults.twilio_auth_token, defaults.business_chat_secret, defaults.app_secret):
        assert value not in repr(defaults)


# --- the live view ---------------------------------------------------------------------------


def test_the_feed_counts_overflow_once_per_conversation_and_keeps_no_personal_data() -> None:
    feed = EventFeed("unused:9092")

    def event(kind: str, conv: str, **data: Any) -> dict[str, Any]:
        return {"type": f"hometeam.{kind}", "time": "2026-11-23T18:31:00+00:00",
                "data": {"conversation_id": conv, "customer_id": f"cus_{conv}0123456789abcdef", "at": "2026-11-23T18:31:00+00:00", **data}}

    feed.fold(event("ConversationQueued", "a", pool="standard", team_id="standard", pool_reason="after_hours", queue_position=1))
    feed.fold(event("ConversationAssigned", "a", pool="standard", team_id="standard", agent_id="std-avery", reason="least_loaded", pool_reason="after_hours"))
    feed.fold(event("ConversationAssigned", "b", pool="home_team", team_id="pnw-seattle", agent_id="sea-ana", reason="known_agent", pool_reason="home_team"))
    feed.fold(event("ConversationAssigned", "c", pool="standard", team_id="standard", agent_id="std-blake", reason="least_loaded", pool_reason="surge"))
    assert feed.overflow == {"after_hours": 1, "surge": 1}
    assert feed.agent_reasons == {"least_loaded": 2, "queued": 1, "known_agent": 1}
    assert [r.customer for r in feed.recent][0] == "cus_c0123456…"


def test_render_shows_pools_routing_kpis_and_urls_and_nothing_personal() -> None:
    now = datetime(2026, 11, 23, 18, 31, tzinfo=UTC)
    snap = Snapshot(
        now=now,
        pools=[
            PoolRow("pnw-seattle", "Seattle", True, "08:00-20:00", "Mon 10:31", 4, 3, 42.0, 4, 22.0, 18.5, True, 20, 3),
            PoolRow("pacific-guam", "Guam", False, "08:00-20:00", "Tue 04:31", 3, 0, None, 0, 0.0, 0.0, False, 0, 0),
            PoolRow("standard", "Standard", None, "24/7", "-", 3, 1, 5.0, 3, 24.0, 10.0, False, 9, 1),
        ],
        recent=[Routing(now, "cus_0123456789…", True, "standard", "standard", "std-avery", "least_loaded", "after_hours")],
        overflow={"after_hours": 7, "surge": 3, "opt_out": 1},
        agent_reasons={"least_loaded": 10, "known_agent": 2},
        events_since=now - timedelta(minutes=5),
        kpis={"pnw-seattle": {"routed": 12, "closed": 5, "staffed_hours": 1.5, "closed_per_staffed_hour": 3.3, "lines_per_turn": 1.4,
                              "first_response_seconds_avg": 12.0, "resolution_seconds_avg": 95.0, "csat_average": 4.5, "csat_responses": 2,
                              "overflow": {"after_hours": 0, "surge": 3, "opt_out": 1}}},
        kpi_window=("2026-11-22T18:00:00+00:00", "2026-11-23T19:00:00+00:00"),
        urls={"KPIs (JSON)": "http://127.0.0.1:8085/kpis"},
        simulator=json.loads(json.dumps({"phase": "running", "elapsed_s": 30, "duration_s": 300, "seed": 42, "rate": 3,
                                         "counters": {"customer_messages": 90, "via_webhook": 30, "via_topic": 60}})),
    )
    text = render(snap)
    for expected in ("pnw-seattle", "pacific-guam", "standard", "SURGE", "closed", "open", "24/7", "least_loaded",
                     "after_hours 7", "surge 3", "opt_out 1", "KPIs per team", "3.3", "1.40", "4.50 (2)", "http://127.0.0.1:8085/kpis"):
        assert expected in text, expected
    assert "\x1b[" not in text
    assert "\x1b[" in render(snap, color=True)
    assert max(len(line) for line in render(snap, width=80).splitlines()) <= 80
    assert "+1" not in text
    for line in (*FIRST_TEXTS, *FOLLOW_UP_TEXTS, *AGENT_TEXTS):
        assert line not in text


def test_dry_run_lines_carry_no_addresses() -> None:
    s = script(rate=1, duration=120)
    addresses = {a for p in s.personas.values() for a in p.addresses}
    for action in s.actions:
        line = json.dumps(describe(action))
        assert not any(a in line for a in addresses)
        if isinstance(action, MessageAction):
            assert action.text not in line


def test_a_directory_without_regions_still_plays() -> None:
    """A team with no region hints gets no customers of its own; the run still works."""
    directory = parse_directory({
        "default_team": "a",
        "standard_pool": {"agents": [{"id": "s1", "max_concurrency": 2}]},
        "teams": [
            {"id": "a", "name": "A", "timezone": "UTC", "hours": {"mon": ["00:00-24:00"]}, "agents": [{"id": "a1", "max_concurrency": 2}]},
            {"id": "b", "name": "B", "timezone": "UTC", "regions": {"area_codes": ["206"]}, "hours": {},
             "agents": [{"id": "b1", "max_concurrency": 2}]},
        ],
    })
    s = build_script(directory, seed=1, rate=1, duration=120, start=DAY)
    assert s.messages and {m.persona.team_id for m in s.messages} == {"b"}
    assert all(m.why in ("after_hours", "returning", "opt_out") for m in s.messages)
