"""Plays a ``Script`` in real time against a running hometeam, and reacts to what it does.

- the script's actions go out at their offsets: presence on ``agent.presence.v1``, customer
  messages through the signed webhooks or on ``channel.inbound.v1``, opt-out/opt-in on
  ``customers.commands.v1``;
- simulated agents hold what ``conversations.events.v1`` says they hold (ConversationAssigned,
  whatever the reason: least loaded, known agent, transfer, agent offline, ...), answer each
  customer message after a human-ish delay (slower when busy), resolve after a few exchanges
  (or after the customer goes quiet), and now and then transfer to an online teammate;
- simulated customers read their replies on ``messages.outbound.v1`` (as a channel adapter
  delivers them) and often answer, sometimes from another channel (an app customer texting
  from the account's phone); after a resolve some answer a satisfaction survey.

Reactive choices are drawn from generators seeded by (seed, customer, exchange), so they are
as repeatable as the system's own timing allows. Customer messages never exceed the script's
budget (rate x duration). Nothing personal is logged: customers appear as "<team>/<n>" or a
truncated customer id, never by address or message text.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import BaseModel

from shared.contracts import conversations as ev
from shared.contracts.agents import AgentPresenceChanged, Presence, ReplyToCustomer, ResolveConversation, TransferConversation
from shared.contracts.common import Channel, ConversationStatus
from shared.contracts.customers import OptInToHomeTeam, OptOutOfHomeTeam
from shared.contracts.envelope import new_envelope
from shared.contracts.messages import CustomerMessageReceived, DeliverMessage
from shared.contracts.registry import (
    AGENT_ACTIONS,
    AGENT_PRESENCE,
    CHANNEL_INBOUND,
    CONVERSATION_EVENTS,
    CUSTOMER_COMMANDS,
    MESSAGES_OUTBOUND,
    MESSAGES_RECEIVED,
    SURVEY_RESPONSES,
)
from shared.contracts.surveys import SurveyAnswered
from shared.teams import TeamDirectory
from tools.simulator.channels import SOURCE, Secrets, channel_message, inbound_record, webhook_request
from tools.simulator.script import (
    AGENT_MORE_TEXTS,
    AGENT_TEXTS,
    FOLLOW_UP_TEXTS,
    MORE_TEXTS,
    WEBHOOK_SHARE,
    MessageAction,
    Persona,
    PreferenceAction,
    PresenceAction,
    Script,
)

EVENT_TYPES: dict[str, type[BaseModel]] = {
    f"hometeam.{m.__name__}": m
    for m in (
        ev.ConversationOpened,
        ev.MessageAdded,
        ev.ConversationAssigned,
        ev.ConversationQueued,
        ev.ConversationStatusChanged,
        ev.ConversationTransferRefused,
        ev.ConversationResolved,
        ev.ConversationClosed,
        ev.CommandRejected,
        CustomerMessageReceived,
        DeliverMessage,
    )
}
ANSWER_PROBABILITY = (0.75, 0.5, 0.3)  # a customer answers the agent's 1st, 2nd, 3rd+ reply
SURVEY_PROBABILITY = 0.35
SURVEY_SCORES = ((5, 0.45), (4, 0.30), (3, 0.12), (2, 0.08), (1, 0.05))
TRANSFER_PROBABILITY = 0.04
SECOND_LINE_PROBABILITY = 0.3  # a customer adds a line right after their message
AGENT_SECOND_LINE_PROBABILITY = 0.2


def short_id(customer_id: str) -> str:
    """A customer id shortened for logs and screens."""
    return customer_id[:12] + "…" if len(customer_id) > 12 else customer_id


class Budget:
    """At most ``total`` customer messages for the whole run. Scripted messages are reserved
    up front (the script never holds more than ``total``); replies to agents get what is left,
    and no faster than ``rate`` per second (with ``slack_s`` seconds' worth of burst)."""

    def __init__(self, total: int, scripted: int = 0, rate: float = float("inf"), slack_s: float = 10.0) -> None:
        self.total = total
        self.used = 0
        self.reserved = min(scripted, total)
        self.rate = rate
        self.slack = rate * slack_s

    def take(self, *, scripted: bool = True, elapsed_s: float | None = None) -> bool:
        if scripted:
            if self.used >= self.total:
                return False
            self.reserved = max(0, self.reserved - 1)
        else:
            if self.used + self.reserved >= self.total:
                return False
            if elapsed_s is not None and self.used + 1 > self.rate * elapsed_s + self.slack:
                return False
        self.used += 1
        return True

    def release(self) -> None:
        """A scripted message that will not be sent after all: free its reservation."""
        self.reserved = max(0, self.reserved - 1)


@dataclass
class Held:
    """A conversation a simulated agent holds."""

    conversation_id: str
    customer_id: str
    agent_id: str
    team_id: str
    target_replies: int
    replies: int = 0
    waiting_on_agent: bool = True
    transfer_tried: bool = False
    task: asyncio.Task[None] | None = None


class Simulator:
    def __init__(
        self,
        script: Script,
        directory: TeamDirectory,
        *,
        bootstrap: str,
        ingest_url: str,
        topic_prefix: str = "",
        secrets: Secrets | None = None,
        http: httpx.AsyncClient | None = None,
        status_file: Path | None = None,
        pace: float = 1.0,
        webhook_share: float = WEBHOOK_SHARE,
        log: Callable[[str], None] | None = None,
        kafka_options: dict[str, Any] | None = None,
        summary_every_s: float = 15.0,
    ) -> None:
        self.script = script
        self.directory = directory
        self.bootstrap = bootstrap
        self.ingest_url = ingest_url.rstrip("/")
        self.prefix = topic_prefix
        self.secrets = secrets or Secrets.from_env()
        self._http = http
        self._own_http = http is None
        self.status_file = status_file
        self.pace = pace
        self.webhook_share = webhook_share
        self._log = log or (lambda line: print(line, flush=True))
        self.kafka_options = kafka_options or {}
        self.summary_every_s = summary_every_s

        self.run_tag = uuid.uuid4().hex[:8]  # provider message ids are unique per run
        self.budget = Budget(script.budget, scripted=len(script.messages), rate=script.rate)
        self.stats: Counter[str] = Counter()
        self.assigned_reasons: Counter[str] = Counter()
        self.pool_reasons: Counter[str] = Counter()
        self.presence: dict[str, Presence] = {}
        self.held: dict[str, Held] = {}
        self.status_of: dict[str, str] = {}
        self.customer_of: dict[str, str] = {}  # persona key -> customer id
        self.persona_of: dict[str, Persona] = {}  # customer id -> persona
        self.open_conversation: dict[str, str] = {}  # customer id -> conversation id
        self.by_address: dict[str, Persona] = {a: p for p in script.personas.values() for a in p.addresses}
        self.answers: Counter[str] = Counter()  # persona key -> replies received so far
        self.answering: set[str] = set()  # persona keys with an answer on its way
        self.written: Counter[str] = Counter()  # persona key -> scripted messages so far
        self.opted_out = asyncio.Event()
        self.opt_out_first_ended = asyncio.Event()
        self.stop = asyncio.Event()
        self.phase = "starting"
        self._tasks: set[asyncio.Task[Any]] = set()
        self._n = 0
        self._t0 = 0.0
        self.started_at = datetime.now(UTC)
        self.producer: AIOKafkaProducer | None = None
        self.consumer: AIOKafkaConsumer | None = None

    # -- helpers ---------------------------------------------------------------------------

    def log(self, text: str) -> None:
        self._log(f"{datetime.now(UTC):%H:%M:%S} sim {text}")

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def rng(self, *parts: str) -> random.Random:
        return random.Random(":".join((str(self.script.seed), *parts)))

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.stats["errors"] += 1
            self.log(f"error: {type(task.exception()).__name__}: {task.exception()}")

    async def sleep(self, seconds: float) -> bool:
        """Sleep, or return early (False) when the run stops."""
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=max(0.0, seconds))
            return False
        except TimeoutError:
            return True

    async def publish(self, topic: str, key: str, payload: BaseModel) -> None:
        assert self.producer is not None
        now = datetime.now(UTC)
        envelope = new_envelope(payload, subject=key, source=SOURCE, time=now, id=str(uuid.uuid4()))
        await self.producer.send_and_wait(self.prefix + topic, envelope.model_dump_json().encode(), key=key.encode())

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Play the script to its end (or until ``stop`` is set); returns the final status."""
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True, linger_ms=5, **self.kafka_options)
        await self.producer.start()
        topics = [self.prefix + t.name for t in (CONVERSATION_EVENTS, MESSAGES_OUTBOUND, MESSAGES_RECEIVED)]
        self.consumer = AIOKafkaConsumer(
            *topics, bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="latest", **self.kafka_options
        )
        await self.consumer.start()
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=10.0)
        try:
            await self._from_the_end_of(topics)
            self._t0 = time.monotonic()
            self.started_at = datetime.now(UTC)
            self.phase = "running"
            self.log(
                f"playing seed={self.script.seed} rate={self.script.rate}/s for {self.script.duration:.0f}s: "
                f"{len(self.script.messages)} scripted customer messages, budget {self.script.budget}; "
                + ", ".join(f"surge on {s.team_id} at +{s.start:.0f}s ({s.messages} customers)" for s in self.script.surges)
            )
            watchers = [self.spawn(self._consume()), self.spawn(self._report())]
            await self._play()
            if not self.stop.is_set():
                await self.sleep(self.script.duration - self.elapsed())
            self.phase = "stopping"
            for task in watchers:
                task.cancel()
        finally:
            self.stop.set()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            try:
                await asyncio.wait_for(self._sign_off(), timeout=5)
            except Exception as exc:  # noqa: BLE001 - best effort on the way out
                self.log(f"could not sign the agents off: {type(exc).__name__}")
            self.phase = "finished"
            self.write_status()
            await self.consumer.stop()
            await self.producer.stop()
            if self._own_http and self._http is not None:
                await self._http.aclose()
        self.log("finished: " + self.one_line())
        return self.status()

    async def _from_the_end_of(self, topics: list[str]) -> None:
        """Wait for every partition to be assigned and positioned at its end, so no event
        after the start is missed."""
        assert self.consumer is not None
        deadline = time.monotonic() + 30
        wanted = set(topics)
        while True:
            assigned = self.consumer.assignment()
            if {tp.topic for tp in assigned} >= wanted:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"topics not available: {sorted(wanted - {tp.topic for tp in assigned})}")
            await asyncio.sleep(0.1)
        await self.consumer.seek_to_end(*assigned)
        for tp in assigned:
            await self.consumer.position(tp)

    async def _sign_off(self) -> None:
        """The end of the simulated day: every agent this run signed in signs out."""
        online = [a for a, p in self.presence.items() if p is not Presence.OFFLINE]
        for agent_id in online:
            await self.publish(AGENT_PRESENCE.name, agent_id, AgentPresenceChanged(agent_id=agent_id, presence=Presence.OFFLINE, changed_at=datetime.now(UTC)))
            self.presence[agent_id] = Presence.OFFLINE
        if online:
            self.log(f"signed {len(online)} agents off")

    # -- the script ------------------------------------------------------------------------

    async def _play(self) -> None:
        for action in self.script.actions:
            if not await self.sleep(action.at - self.elapsed()):
                return
            if isinstance(action, PresenceAction):
                self.spawn(self._presence(action))
            elif isinstance(action, PreferenceAction):
                self.spawn(self._preference(action))
            elif isinstance(action, MessageAction):
                self.spawn(self._scripted_message(action))

    async def _presence(self, action: PresenceAction) -> None:
        self.presence[action.agent_id] = action.presence
        await self.publish(
            AGENT_PRESENCE.name,
            action.agent_id,
            AgentPresenceChanged(agent_id=action.agent_id, presence=action.presence, changed_at=datetime.now(UTC)),
        )
        self.stats[f"presence_{action.presence.value}"] += 1
        if action.why not in ("reset",):
            self.log(f"agent {action.agent_id} ({action.pool_id}) {action.presence.value}: {action.why.replace('_', ' ')}")

    async def _customer_id(self, persona: Persona, wait_s: float) -> str | None:
        deadline = time.monotonic() + wait_s
        while persona.key not in self.customer_of and time.monotonic() < deadline:
            if not await self.sleep(0.25):
                return None
        return self.customer_of.get(persona.key)

    async def _preference(self, action: PreferenceAction) -> None:
        customer_id = await self._customer_id(action.persona, 30)
        if customer_id is None:
            self.log(f"{'opt-out' if action.opt_out else 'opt-in'} of {action.persona.key} skipped: customer not known yet")
            return
        command_id = f"sim-{uuid.uuid4().hex}"
        now = datetime.now(UTC)
        if action.opt_out:
            payload: BaseModel = OptOutOfHomeTeam(command_id=command_id, customer_id=customer_id, requested_at=now)
        else:
            payload = OptInToHomeTeam(command_id=command_id, customer_id=customer_id, requested_at=now)
        await self.publish(CUSTOMER_COMMANDS.name, customer_id, payload)
        self.stats["opt_outs" if action.opt_out else "opt_ins"] += 1
        self.log(f"customer {short_id(customer_id)} ({action.persona.key}) {'opted out of' if action.opt_out else 'opted back in to'} their home team")
        if action.opt_out:
            self.opted_out.set()

    async def _scripted_message(self, action: MessageAction) -> None:
        if action.why == "opt_out" and self.stats["opt_out_messages"] > 0:
            # The opt-out customer's second message: after the opt-out, and once their first
            # conversation is over, so it needs a new place (standard pool, reason opt_out).
            deadline = time.monotonic() + 90
            while not (self.opted_out.is_set() and self.opt_out_first_ended.is_set()) and time.monotonic() < deadline:
                if not await self.sleep(0.5):
                    self.budget.release()
                    return
        if action.why == "opt_out":
            self.stats["opt_out_messages"] += 1
        n = self.written[action.persona.key]
        self.written[action.persona.key] = n + 1
        if await self.send(action.persona, action.text, action.via, action.why, scripted=True) and action.why != "opt_out":
            await self._maybe_second_line(action.persona, action.via, self.rng("lines", action.persona.key, str(n)))

    async def _maybe_second_line(self, persona: Persona, via: str, rng: random.Random, by_phone: bool = False) -> None:
        """Customers often write in bursts: sometimes a second line follows within seconds."""
        if rng.random() < SECOND_LINE_PROBABILITY and await self.sleep(self.pace * rng.uniform(1.5, 5)):
            await self.send(persona, rng.choice(MORE_TEXTS), via, "second_line", by_phone=by_phone)

    # -- customers -------------------------------------------------------------------------

    async def send(self, persona: Persona, text: str, via: str, why: str, *, by_phone: bool = False, scripted: bool = False) -> bool:
        """One customer message, through a webhook or the topic; within the budget only (a
        reply that does not fit is not written: the customer stays quiet)."""
        if not self.budget.take(scripted=scripted, elapsed_s=None if scripted else self.elapsed()):
            self.stats["held_back"] += 1
            return False
        self._n += 1
        channel = Channel.SMS if by_phone or persona.channel is Channel.SMS else persona.channel
        provider_id = (f"SM{self.run_tag}{self._n:08d}" if channel is Channel.SMS else f"sim-{self.run_tag}-{self._n}")
        now = datetime.now(UTC)
        if via == "webhook":
            request = webhook_request(persona, text, provider_id, now, self.secrets, by_phone=by_phone)
            assert self._http is not None
            try:
                response = await self._http.post(self.ingest_url + request.path, content=request.content, headers=request.headers)
            except httpx.HTTPError as exc:
                self.stats["webhook_errors"] += 1
                self.log(f"webhook {request.path} failed: {type(exc).__name__}")
                return False
            if response.status_code >= 300:
                self.stats["webhook_errors"] += 1
                self.log(f"webhook {request.path} answered {response.status_code}: {response.text[:200]}")
                return False
        else:
            assert self.producer is not None
            key, value = inbound_record(channel_message(persona, text, provider_id, now, by_phone=by_phone), now)
            await self.producer.send_and_wait(self.prefix + CHANNEL_INBOUND.name, value, key=key)
        self.stats["customer_messages"] += 1
        self.stats[f"via_{via}"] += 1
        self.stats[f"kind_{why}"] += 1
        self.stats[f"channel_{channel.value}"] += 1
        return True

    def _delivered(self, delivery: DeliverMessage) -> None:
        """An agent's reply reached the customer: maybe they answer."""
        persona = self.by_address.get(delivery.address)
        if persona is None:
            return
        self._learn(persona, delivery.customer_id)
        if self.script.opt_out is not None and persona.key == self.script.opt_out.key:
            return  # they only wanted to be heard; the agent wraps up
        if persona.key in self.answering:
            return  # already typing an answer (the agent wrote two lines)
        n = self.answers[persona.key]
        self.answers[persona.key] = n + 1
        rng = self.rng("answer", persona.key, str(n))
        if rng.random() >= ANSWER_PROBABILITY[min(n, len(ANSWER_PROBABILITY) - 1)]:
            return
        delay = self.pace * rng.uniform(3, 12)
        via = "webhook" if rng.random() < self.webhook_share else "topic"
        by_phone = persona.linked_phone is not None and rng.random() < 0.25
        text = rng.choice(FOLLOW_UP_TEXTS)

        async def answer() -> None:
            try:
                if await self.sleep(delay) and await self.send(persona, text, via, "reply", by_phone=by_phone):
                    await self._maybe_second_line(persona, via, rng, by_phone)
            finally:
                self.answering.discard(persona.key)

        self.answering.add(persona.key)
        self.spawn(answer())

    def _learn(self, persona: Persona, customer_id: str) -> None:
        self.customer_of[persona.key] = customer_id
        self.persona_of[customer_id] = persona

    # -- agents ----------------------------------------------------------------------------

    def _is_ours(self, agent_id: str | None) -> bool:
        return agent_id is not None and self.directory.pool_of_agent(agent_id) is not None

    def _load(self, agent_id: str) -> int:
        return sum(1 for h in self.held.values() if h.agent_id == agent_id)

    def _then(self, held: Held, delay: float, step: Callable[[Held], Awaitable[None]]) -> None:
        if held.task is not None and not held.task.done() and held.task is not asyncio.current_task():
            held.task.cancel()

        async def later() -> None:
            if await self.sleep(delay):
                await step(held)

        held.task = self.spawn(later())

    def _target_replies(self, customer_id: str, conversation_id: str) -> int:
        if self.script.opt_out is not None and self.persona_of.get(customer_id) == self.script.opt_out:
            return 1
        return self.rng("exchanges", conversation_id).choices((1, 2, 3), (0.3, 0.45, 0.25))[0]

    def _hold(self, conversation_id: str, customer_id: str, agent_id: str, team_id: str) -> Held:
        held = self.held.get(conversation_id)
        if held is not None and held.agent_id != agent_id:
            if held.task is not None:
                held.task.cancel()
            held.agent_id, held.team_id, held.task = agent_id, team_id, None
        if held is None:
            held = Held(conversation_id, customer_id, agent_id, team_id, self._target_replies(customer_id, conversation_id))
            self.held[conversation_id] = held
        held.waiting_on_agent = self.status_of.get(conversation_id) != ConversationStatus.WAITING_ON_CUSTOMER.value
        return held

    def _next_step(self, held: Held) -> None:
        if held.waiting_on_agent:
            rng = self.rng("reply-delay", held.conversation_id, str(held.replies))
            delay = min(30.0, self.pace * rng.uniform(2, 7) * (1 + 0.15 * max(0, self._load(held.agent_id) - 1)))
            self._then(held, delay, self._reply)
        elif held.replies >= held.target_replies:
            self._then(held, self.pace * self.rng("wrap", held.conversation_id).uniform(3, 8), self._resolve)
        else:
            # Waiting on a customer who may not answer: wrap up after a while.
            self._then(held, self.pace * self.rng("quiet", held.conversation_id, str(held.replies)).uniform(25, 40), self._resolve)

    async def _agent_line(self, held: Held, text: str) -> None:
        """The holding agent writes one line to the customer."""
        await self.publish(
            AGENT_ACTIONS.name,
            held.customer_id,
            ReplyToCustomer(
                action_id=f"sim-{uuid.uuid4().hex}",
                customer_id=held.customer_id,
                conversation_id=held.conversation_id,
                agent_id=held.agent_id,
                text=text,
                sent_at=datetime.now(UTC),
            ),
        )
        self.stats["agent_replies"] += 1

    async def _reply(self, held: Held) -> None:
        if self.held.get(held.conversation_id) is not held or self.presence.get(held.agent_id) is Presence.OFFLINE:
            return
        rng = self.rng("reply", held.conversation_id, str(held.replies))
        await self._agent_line(held, rng.choice(AGENT_TEXTS))
        held.replies += 1
        held.waiting_on_agent = False
        if rng.random() < AGENT_SECOND_LINE_PROBABILITY and await self.sleep(self.pace * rng.uniform(1, 3)):
            if self.held.get(held.conversation_id) is not held:
                return
            await self._agent_line(held, rng.choice(AGENT_MORE_TEXTS))
        if held.replies == 1 and not held.transfer_tried and rng.random() < TRANSFER_PROBABILITY:
            held.transfer_tried = True
            pool = self.directory.pool_of_agent(held.agent_id) or ""
            mates = sorted(a for a in self.directory.agents_of(pool) if a != held.agent_id and self.presence.get(a) is Presence.ONLINE)
            if mates:
                self._then(held, self.pace * rng.uniform(2, 5), lambda h, to=rng.choice(mates): self._transfer(h, to))
                return
        self._next_step(held)

    async def _transfer(self, held: Held, to_agent: str) -> None:
        if self.held.get(held.conversation_id) is not held:
            return
        await self.publish(
            AGENT_ACTIONS.name,
            held.customer_id,
            TransferConversation(
                action_id=f"sim-{uuid.uuid4().hex}",
                customer_id=held.customer_id,
                conversation_id=held.conversation_id,
                agent_id=held.agent_id,
                to_agent_id=to_agent,
                note="specialist topic",
                requested_at=datetime.now(UTC),
            ),
        )
        self.stats["agent_transfers"] += 1
        self.log(f"agent {held.agent_id} transfers {short_id(held.customer_id)} to teammate {to_agent}")
        # If the transfer is refused, the agent keeps the conversation and wraps it up.
        self._then(held, self.pace * 30, self._resolve)

    async def _resolve(self, held: Held) -> None:
        if self.held.get(held.conversation_id) is not held or self.presence.get(held.agent_id) is Presence.OFFLINE:
            return
        await self.publish(
            AGENT_ACTIONS.name,
            held.customer_id,
            ResolveConversation(
                action_id=f"sim-{uuid.uuid4().hex}",
                customer_id=held.customer_id,
                conversation_id=held.conversation_id,
                agent_id=held.agent_id,
                resolved_at=datetime.now(UTC),
            ),
        )
        self.stats["agent_resolves"] += 1

    async def _survey(self, customer_id: str, conversation_id: str) -> None:
        rng = self.rng("survey", conversation_id)
        if rng.random() >= SURVEY_PROBABILITY:
            return
        score = rng.choices([s for s, _ in SURVEY_SCORES], [w for _, w in SURVEY_SCORES])[0]
        if not await self.sleep(self.pace * rng.uniform(2, 6)):
            return
        await self.publish(
            SURVEY_RESPONSES.name,
            customer_id,
            SurveyAnswered(
                survey_id=f"sim-{uuid.uuid4().hex}", customer_id=customer_id, conversation_id=conversation_id, score=score, answered_at=datetime.now(UTC)
            ),
        )
        self.stats["surveys"] += 1

    # -- what the system says --------------------------------------------------------------

    async def _consume(self) -> None:
        assert self.consumer is not None
        while not self.stop.is_set():
            batches = await self.consumer.getmany(timeout_ms=300, max_records=1000)
            for records in batches.values():
                for record in records:
                    try:
                        envelope = json.loads(record.value)
                        model = EVENT_TYPES.get(envelope.get("type", ""))
                        if model is not None:
                            self.on_event(model.model_validate(envelope["data"]))
                    except Exception as exc:  # noqa: BLE001 - a record we cannot read is skipped
                        self.stats["unreadable_records"] += 1
                        self.log(f"skipped a record of {record.topic}: {type(exc).__name__}")

    def on_event(self, event: BaseModel) -> None:
        if isinstance(event, CustomerMessageReceived):
            persona = self.by_address.get(event.address)
            if persona is not None:
                self._learn(persona, event.customer_id)
        elif isinstance(event, DeliverMessage):
            self._delivered(event)
        elif isinstance(event, ev.ConversationOpened):
            self.open_conversation[event.customer_id] = event.conversation_id
        elif isinstance(event, ev.ConversationStatusChanged):
            self.status_of[event.conversation_id] = event.status.value
        elif isinstance(event, ev.ConversationAssigned):
            self.assigned_reasons[event.reason.value] += 1
            self.pool_reasons[event.pool_reason.value] += 1
            if self._is_ours(event.agent_id):
                self._next_step(self._hold(event.conversation_id, event.customer_id, event.agent_id, event.team_id))
        elif isinstance(event, ev.ConversationQueued):
            self.stats["queued"] += 1
            self.pool_reasons[event.pool_reason.value] += 1
        elif isinstance(event, ev.MessageAdded):
            if event.direction.value != "inbound":
                return
            held = self.held.get(event.conversation_id)
            if held is None and self._is_ours(event.agent_id) and event.team_id:
                # A conversation an agent already held before this run: adopt it.
                held = self._hold(event.conversation_id, event.customer_id, event.agent_id, event.team_id)  # type: ignore[arg-type]
            if held is not None:
                held.waiting_on_agent = True
                self._next_step(held)
        elif isinstance(event, (ev.ConversationResolved, ev.ConversationClosed)):
            held = self.held.pop(event.conversation_id, None)
            if held is not None and held.task is not None and held.task is not asyncio.current_task():
                held.task.cancel()
            self.status_of.pop(event.conversation_id, None)
            if self.open_conversation.get(event.customer_id) == event.conversation_id:
                del self.open_conversation[event.customer_id]
            if isinstance(event, ev.ConversationResolved):
                self.stats["resolved"] += 1
                self.spawn(self._survey(event.customer_id, event.conversation_id))
            else:
                self.stats["closed_inactive"] += 1
            if self.script.opt_out is not None and self.persona_of.get(event.customer_id) == self.script.opt_out:
                self.opt_out_first_ended.set()
        elif isinstance(event, ev.CommandRejected):
            if event.command_id.startswith("sim-"):
                self.stats[f"rejected_{event.reason}"] += 1
        elif isinstance(event, ev.ConversationTransferRefused):
            self.stats["transfers_refused"] += 1

    # -- status ----------------------------------------------------------------------------

    def one_line(self) -> str:
        s = self.stats
        return (
            f"t={self.elapsed():.0f}s customers sent {s['customer_messages']}/{self.budget.total} "
            f"(webhooks {s['via_webhook']}, topic {s['via_topic']}, webhook errors {s['webhook_errors']}) | "
            f"agents: {s['agent_replies']} replies, {s['agent_resolves']} resolves, {s['agent_transfers']} transfers | "
            f"resolved {s['resolved']}, surveys {s['surveys']}, holding {len(self.held)} | "
            "assigned " + ", ".join(f"{k} {v}" for k, v in self.assigned_reasons.most_common())
        )

    def status(self) -> dict[str, Any]:
        surges = [
            {
                "team": s.team_id,
                "from": (self.started_at + timedelta(seconds=s.start)).isoformat(),
                "to": (self.started_at + timedelta(seconds=s.end)).isoformat(),
                "customers": s.messages,
            }
            for s in self.script.surges
        ]
        opt_out = None
        if self.script.opt_out is not None:
            cid = self.customer_of.get(self.script.opt_out.key)
            opt_out = {"team": self.script.opt_out.team_id, "customer": short_id(cid) if cid else None, "opted_out": self.opted_out.is_set()}
        return {
            "phase": self.phase,
            "seed": self.script.seed,
            "rate": self.script.rate,
            "duration_s": self.script.duration,
            "started_at": self.started_at.isoformat(),
            "ends_at": (self.started_at + timedelta(seconds=self.script.duration)).isoformat(),
            "elapsed_s": round(self.elapsed(), 1) if self._t0 else 0.0,
            "budget": self.budget.total,
            "counters": dict(sorted(self.stats.items())),
            "assigned_reasons": dict(self.assigned_reasons),
            "pool_reasons": dict(self.pool_reasons),
            "agents_signed_in": sorted(a for a, p in self.presence.items() if p is Presence.ONLINE),
            "agents_away": sorted(a for a, p in self.presence.items() if p is Presence.AWAY),
            "holding": len(self.held),
            "surges": surges,
            "opt_out": opt_out,
            "pid": os.getpid(),
            "updated_at": datetime.now(UTC).isoformat(),
        }

    def write_status(self) -> None:
        if self.status_file is None:
            return
        tmp = self.status_file.with_suffix(self.status_file.suffix + ".tmp")
        tmp.write_text(json.dumps(self.status(), indent=1))
        tmp.replace(self.status_file)

    async def _report(self) -> None:
        last_summary = 0.0
        while not self.stop.is_set():
            self.write_status()
            if self.elapsed() - last_summary >= self.summary_every_s:
                last_summary = self.elapsed()
                self.log(self.one_line())
            await self.sleep(1.0)
