"""The simulator's plan: a pure function of (team directory, seed, rate, duration, start time).

The same inputs always give the same actions at the same offsets (seconds from the start):

- presence: every agent signs out at the start (a clean slate: conversations a previous run
  left with them go back to their team's queue), then the agents of each open team and of the
  24/7 standard pool sign in within a few seconds; a team that opens during the run signs in
  then, one that closes steps away shortly before and signs out shortly after; a few agents
  take a break (away) or sign out early mid-shift and come back;
- customers: new contacts arrive at random over the run from every region (a closed team's
  region writes less, as at night, but still writes: that is the after-hours traffic); some
  are customers of this run writing again later (a returning customer: their known agent);
  each message goes through a signed webhook for a share of the traffic and straight to
  ``channel.inbound.v1`` for the rest;
- an opt-out customer: writes, opts out of their home team, writes again (standard pool,
  reason opt_out), and opts back in later;
- a local surge: a burst of new customers from one open region for ~30 s, sized from that
  team's capacity and surge threshold so it overflows to the standard pool and then recovers;
  repeated every 30 minutes in long runs.

Rate and duration bound the customer messages: the script holds at most ``budget`` (rate x
duration) of them, about 30% of it, and the runner's replies to agents use the rest of the
budget and never more (nor faster than the rate allows, give or take ten seconds' worth).
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from shared.contracts.agents import Presence
from shared.contracts.common import Channel
from shared.contracts.routing import STANDARD_POOL_ID
from shared.teams import Team, TeamDirectory, home_team_for, is_open, next_change

FIRST_CONTACT_SHARE = 0.3  # of the budget: first messages; the runner's replies fill the rest
SURGE_SHARE = 0.25  # of the budget, at most, for the surges
CLOSED_REGION_WEIGHT = 0.3  # a closed team's region writes less (night), but writes
RETURNING_SHARE = 0.2  # of new contacts: a customer of this run writing again
RETURN_AFTER_S = 60.0  # ... at least this long after their previous contact
SURGE_SECONDS = 30.0
SURGE_EVERY_S = 1800.0
SURGE_FACTOR = 2.0  # surge size: this x (team capacity at half weight + its queue threshold)
WEBHOOK_SHARE = 0.35
BUSINESS_NUMBER = "+18005550100"  # the number SMS customers text
BUSINESS_CHAT_ID = "hometeam-care"

FIRST_TEXTS = (
    "my internet has been down since this morning",
    "I'd like to upgrade my plan",
    "my bill is higher than usual this month",
    "how do I set up voicemail on my new phone?",
    "I'm moving next month, can I keep my service?",
    "the app says my payment failed",
    "can you add an international pass to my line?",
    "my phone shows no service at home",
    "I need help activating an eSIM",
    "why was I charged a late fee?",
)
RETURNING_TEXTS = (
    "hi again, the same problem is back",
    "following up on what we talked about earlier",
    "one more question about my plan",
    "the fix worked for a while but not anymore",
)
SURGE_TEXTS = (
    "is there an outage? no signal since the storm",
    "internet down here too after the storm",
    "no service in my neighbourhood right now",
    "is the network down in my area?",
    "lost my connection an hour ago, outage?",
)
OPT_OUT_TEXTS = ("I'd rather talk to whoever is available, any time of day",)
FOLLOW_UP_TEXTS = (
    "ok, trying that now",
    "still not working",
    "that worked, thanks!",
    "what does that cost?",
    "can you check again?",
    "great, thank you",
    "sent you a photo of the error",
)
MORE_TEXTS = (  # a second line right after the first: customers often write in bursts
    "also, it started after the last update",
    "I already restarted it twice",
    "it's the same on my other line",
    "and the app shows an error code",
)
AGENT_MORE_TEXTS = (
    "I can see the issue on our side as well.",
    "One more thing: you'll get a confirmation by text.",
)
AGENT_TEXTS = (
    "Thanks for reaching out, I'm looking at your account now.",
    "Could you restart the device and tell me what you see?",
    "I've applied a fix on our side; can you try again?",
    "I've added a credit; you'll see it on the next bill.",
    "That's done. Anything else I can help with?",
    "Let me check that for you, one moment.",
)


@dataclass(frozen=True, slots=True)
class Persona:
    """A simulated customer: which region (team) they live in, how they write to us."""

    key: str  # "<team>/<n>": how logs and the status file name them (no personal data)
    team_id: str
    channel: Channel
    address: str  # E.164 phone (SMS), opaque source id (business chat), account id (app)
    linked_phone: str | None = None  # app only: the account's phone, linking the SMS identity
    zip: str | None = None
    market: str | None = None

    @property
    def addresses(self) -> tuple[str, ...]:
        return (self.address,) if self.linked_phone is None else (self.address, self.linked_phone)


@dataclass(frozen=True, slots=True)
class PresenceAction:
    at: float
    agent_id: str
    pool_id: str
    presence: Presence
    why: str  # reset, shift_start, wrap_up, shift_end, break, back, signed_out_early


@dataclass(frozen=True, slots=True)
class MessageAction:
    at: float
    persona: Persona
    text: str
    via: str  # "webhook" or "topic"
    why: str  # new, after_hours, returning, surge, opt_out


@dataclass(frozen=True, slots=True)
class PreferenceAction:
    at: float
    persona: Persona
    opt_out: bool


Action = PresenceAction | MessageAction | PreferenceAction


@dataclass(frozen=True, slots=True)
class Surge:
    team_id: str
    start: float
    end: float
    messages: int


@dataclass(frozen=True)
class Script:
    seed: int
    rate: float
    duration: float
    start: datetime
    budget: int  # customer messages the whole run may send (rate x duration)
    actions: tuple[Action, ...]
    surges: tuple[Surge, ...] = ()
    opt_out: Persona | None = None
    personas: dict[str, Persona] = field(default_factory=dict, compare=False)

    @property
    def messages(self) -> list[MessageAction]:
        return [a for a in self.actions if isinstance(a, MessageAction)]


def _zip_in(prefixes: list[str], rng: random.Random) -> str:
    prefix = rng.choice(prefixes)
    return prefix + "".join(str(rng.randrange(10)) for _ in range(5 - len(prefix)))


def _phone(area_codes: list[str], index: int, base: int) -> str:
    area = area_codes[index % len(area_codes)]
    return f"+1{area}555{(base + index // len(area_codes)) % 10000:04d}"


def persona(directory: TeamDirectory, team: Team, index: int, seed: int) -> Persona | None:
    """The ``index``-th customer of ``team``'s region: same inputs, same persona. Phone numbers
    are in the 555 exchange; every persona provably maps to its team (``home_team_for``)."""
    rng = random.Random(f"{seed}:persona:{team.id}:{index}")
    regions = team.regions
    options: list[tuple[Channel, float]] = []
    if regions.area_codes:
        options.append((Channel.SMS, 0.45))
    if regions.markets:
        options.append((Channel.BUSINESS_CHAT, 0.25))
    if regions.zip_prefixes or regions.markets:
        options.append((Channel.APP, 0.30))
    key = f"{team.id}/{index}"
    while options:
        channel = rng.choices([c for c, _ in options], [w for _, w in options])[0]
        options = [o for o in options if o[0] is not channel]
        if channel is Channel.SMS:
            p = Persona(key, team.id, channel, _phone(regions.area_codes, index, 100))
        elif channel is Channel.BUSINESS_CHAT:
            p = Persona(key, team.id, channel, f"urn:biz:sim{seed}-{team.id}-{index}", market=rng.choice(regions.markets))
        else:
            zip_code = _zip_in(regions.zip_prefixes, rng) if regions.zip_prefixes else None
            linked = _phone(regions.area_codes, index, 5000) if regions.area_codes and rng.random() < 0.5 else None
            p = Persona(
                key,
                team.id,
                channel,
                f"sim{seed}-{team.id}-{index}",
                linked_phone=linked,
                zip=zip_code,
                market=None if zip_code else rng.choice(regions.markets),
            )
        served_by, _ = home_team_for(directory, channel=p.channel, address=p.address, zip_code=p.zip, market=p.market)
        if served_by == team.id:
            return p
    return None


class _Personas:
    """Hands out each team's next new persona, and remembers who wrote when (for returns)."""

    def __init__(self, directory: TeamDirectory, seed: int) -> None:
        self.directory = directory
        self.seed = seed
        self.next_index: dict[str, int] = {t.id: 0 for t in directory.teams}
        self.used: dict[str, list[tuple[float, Persona]]] = {t.id: [] for t in directory.teams}
        self.all: dict[str, Persona] = {}

    def new(self, team: Team) -> Persona | None:
        for _ in range(20):
            index = self.next_index[team.id]
            self.next_index[team.id] = index + 1
            p = persona(self.directory, team, index, self.seed)
            if p is not None:
                self.all[p.key] = p
                return p
        return None

    def wrote(self, at: float, p: Persona) -> None:
        self.used[p.team_id].append((at, p))

    def returning(self, team: Team, at: float, rng: random.Random, exclude: Persona | None) -> Persona | None:
        history = self.used[team.id]
        eligible = history[: bisect.bisect_right([t for t, _ in history], at - RETURN_AFTER_S)]
        eligible = [p for _, p in eligible if p != exclude]
        return rng.choice(eligible) if eligible else None


def _transitions(team: Team, start: datetime, duration: float) -> list[tuple[float, bool]]:
    """When the team opens (True) or closes (False) during the run, as offsets in seconds."""
    out: list[tuple[float, bool]] = []
    at = start
    while True:
        change = next_change(team, at, horizon=timedelta(days=2))
        if change is None:
            return out
        offset = (change - start).total_seconds()
        if offset > duration:
            return out
        out.append((offset, is_open(team, change)))
        at = change


def build_script(
    directory: TeamDirectory,
    *,
    seed: int,
    rate: float,
    duration: float,
    start: datetime,
    webhook_share: float = WEBHOOK_SHARE,
) -> Script:
    """The plan of one run. Deterministic: the same arguments give an equal ``Script``."""
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    rng = random.Random(f"{seed}:script")
    budget = int(rate * duration)
    teams = sorted(directory.teams, key=lambda t: t.id)
    personas = _Personas(directory, seed)
    open_cache: dict[tuple[str, int], bool] = {}

    def open_at(team: Team, t: float) -> bool:
        key = (team.id, int(t))  # hours change on whole minutes: a second's resolution is plenty
        if key not in open_cache:
            open_cache[key] = is_open(team, start + timedelta(seconds=int(t)))
        return open_cache[key]

    presence: list[PresenceAction] = []
    stagger = min(8.0, 0.1 * duration)

    def at(t: float) -> float:
        return round(min(max(t, 0.0), duration), 3)

    # Who is (going to be) online when: the standard pool always; a team while it is open.
    pools: list[tuple[str, Team | None]] = [(STANDARD_POOL_ID, None)] + [(t.id, t) for t in teams]
    for pool_id, team in pools:
        agents = directory.agents_of(pool_id)
        for agent_id in sorted(agents):
            presence.append(PresenceAction(0.0, agent_id, pool_id, Presence.OFFLINE, "reset"))
        if team is None or open_at(team, 0):
            for agent_id in sorted(agents):
                presence.append(PresenceAction(at(0.2 + rng.uniform(0, stagger)), agent_id, pool_id, Presence.ONLINE, "shift_start"))
        if team is None:
            continue
        opened_at = 0.0
        for offset, opens in _transitions(team, start, duration):
            for agent_id in sorted(agents):
                if opens:
                    presence.append(PresenceAction(at(offset + rng.uniform(0, 20)), agent_id, pool_id, Presence.ONLINE, "shift_start"))
                else:
                    wrap = max(offset - rng.uniform(30, 90), opened_at + 1, 0.5)
                    presence.append(PresenceAction(at(wrap), agent_id, pool_id, Presence.AWAY, "wrap_up"))
                    presence.append(PresenceAction(at(offset + rng.uniform(5, 45)), agent_id, pool_id, Presence.OFFLINE, "shift_end"))
            if opens:
                opened_at = offset

    # Mid-shift: breaks (away, then back) and early sign-outs (offline, then back).
    def on_shift(t_from: float, t_to: float) -> list[tuple[str, str]]:
        out = []
        for team in teams:
            if all(open_at(team, t) for t in (0.0, t_from, (t_from + t_to) / 2, t_to)):
                out.extend((a.id, team.id) for a in team.agents)
        return sorted(out)

    busy: dict[str, list[tuple[float, float]]] = {}

    def free(agent_id: str, t_from: float, t_to: float) -> bool:
        return all(t_to + 30 < a or b + 30 < t_from for a, b in busy.get(agent_id, []))

    def step_out(t: float, length: float, presence_out: Presence, why: str) -> None:
        candidates = [c for c in on_shift(t, t + length + 5) if free(c[0], t, t + length)]
        if candidates:
            agent_id, pool_id = rng.choice(candidates)
            busy.setdefault(agent_id, []).append((t, t + length))
            presence.append(PresenceAction(at(t), agent_id, pool_id, presence_out, why))
            presence.append(PresenceAction(at(t + length), agent_id, pool_id, Presence.ONLINE, "back"))

    if duration >= 30:
        n_breaks = max(1, int(duration // 600))
        for k in range(n_breaks):
            step_out(duration * (k + 0.35) / n_breaks, min(rng.uniform(40, 90), 0.2 * duration), Presence.AWAY, "break")
    if duration >= 60:
        n_out = max(1, int(duration // 1200))
        for k in range(n_out):
            step_out(duration * (k + 0.6) / n_out, min(rng.uniform(60, 120), 0.2 * duration), Presence.OFFLINE, "signed_out_early")

    def via() -> str:
        return "webhook" if rng.random() < webhook_share else "topic"

    messages: list[MessageAction] = []
    preferences: list[PreferenceAction] = []

    # The opt-out customer: prefer an open team, so the contrast with home-team routing shows.
    opt_out: Persona | None = None
    if duration >= 60 and budget >= 4:
        t1 = min(max(0.1 * duration, 8.0), 60.0)
        ordered = sorted(teams, key=lambda tm: (not open_at(tm, t1), tm.id))
        for team in ordered:
            opt_out = personas.new(team)
            if opt_out is not None:
                break
        if opt_out is not None:
            messages.append(MessageAction(at(t1), opt_out, OPT_OUT_TEXTS[0], via(), "opt_out"))
            preferences.append(PreferenceAction(at(t1 + min(25.0, 0.15 * duration)), opt_out, True))
            messages.append(MessageAction(at(t1 + min(45.0, 0.3 * duration)), opt_out, rng.choice(RETURNING_TEXTS), via(), "opt_out"))
            preferences.append(PreferenceAction(at(min(t1 + max(180.0, 0.5 * duration), duration - 1)), opt_out, False))

    # Local surges: one open region's customers all write within ~30 s.
    surges: list[Surge] = []
    if duration >= 40:
        first = min(max(0.2 * duration, 20.0), 150.0)
        starts = []
        s = first
        while s + SURGE_SECONDS <= duration - 5:
            starts.append(s)
            s += SURGE_EVERY_S
        per_surge = int(SURGE_SHARE * budget / max(1, len(starts)))
        length = min(SURGE_SECONDS, 0.25 * duration)
        for s in starts:
            candidates = [
                tm for tm in teams if open_at(tm, s) and open_at(tm, s + length) and persona(directory, tm, 0, seed) is not None
            ]
            if not candidates:
                continue

            def size(tm: Team) -> int:
                cap = sum(a.max_concurrency for a in tm.agents)
                return math.ceil(SURGE_FACTOR * (2 * cap + tm.surge.max_queue_depth))

            team = min(candidates, key=lambda tm: (size(tm), tm.id))
            count = min(size(team), per_surge)
            if count <= 0:
                continue
            times = sorted(rng.uniform(s, s + length) for _ in range(count))
            sent = 0
            for t in times:
                p = personas.new(team)
                if p is None:
                    break
                personas.wrote(t, p)
                messages.append(MessageAction(at(t), p, rng.choice(SURGE_TEXTS), via(), "surge"))
                sent += 1
            surges.append(Surge(team.id, round(s, 3), round(s + length, 3), sent))

    # Everyday traffic from every region: first contacts and returning customers.
    writers = [tm for tm in teams if persona(directory, tm, 0, seed) is not None]
    baseline = max(0, min(int(FIRST_CONTACT_SHARE * budget), budget) - len(messages))
    if writers:
        times = sorted(rng.uniform(1.0, max(1.0, duration - 1.0)) for _ in range(baseline))
        for t in times:
            weights = [1.0 if open_at(tm, t) else CLOSED_REGION_WEIGHT for tm in writers]
            team = rng.choices(writers, weights)[0]
            p = personas.returning(team, t, rng, opt_out) if rng.random() < RETURNING_SHARE else None
            if p is not None:
                why, text = "returning", rng.choice(RETURNING_TEXTS)
            else:
                p = personas.new(team)
                if p is None:
                    continue
                why, text = ("new" if open_at(team, t) else "after_hours"), rng.choice(FIRST_TEXTS)
            personas.wrote(t, p)
            messages.append(MessageAction(at(t), p, text, via(), why))

    # Never more scripted messages than the budget (tiny budgets): drop the latest ones.
    messages.sort(key=lambda m: m.at)
    del messages[budget:]

    order = {PresenceAction: 0, PreferenceAction: 1, MessageAction: 2}
    actions: list[Action] = [*presence, *preferences, *messages]
    indexed = sorted(enumerate(actions), key=lambda ia: (ia[1].at, order[type(ia[1])], ia[0]))
    return Script(
        seed=seed,
        rate=rate,
        duration=duration,
        start=start,
        budget=budget,
        actions=tuple(a for _, a in indexed),
        surges=tuple(surges),
        opt_out=opt_out,
        personas=dict(personas.all),
    )


def describe(action: Action) -> dict[str, Any]:
    """One action as a JSON-able line without personal data (``--dry-run`` prints these)."""
    if isinstance(action, PresenceAction):
        return {"at": action.at, "do": "presence", "agent": action.agent_id, "pool": action.pool_id,
                "presence": action.presence.value, "why": action.why}
    if isinstance(action, PreferenceAction):
        return {"at": action.at, "do": "opt_out" if action.opt_out else "opt_in", "customer": action.persona.key}
    return {"at": action.at, "do": "message", "customer": action.persona.key, "team": action.persona.team_id,
            "channel": action.persona.channel.value, "via": action.via, "why": action.why}


def summary(script: Script) -> dict[str, Any]:
    """Counts by kind, for the log and ``--dry-run``."""
    by_why: dict[str, int] = {}
    by_channel: dict[str, int] = {}
    by_via: dict[str, int] = {}
    for m in script.messages:
        by_why[m.why] = by_why.get(m.why, 0) + 1
        by_channel[m.persona.channel.value] = by_channel.get(m.persona.channel.value, 0) + 1
        by_via[m.via] = by_via.get(m.via, 0) + 1
    presence = [a for a in script.actions if isinstance(a, PresenceAction)]
    return {
        "seed": script.seed,
        "rate": script.rate,
        "duration_s": script.duration,
        "start": script.start.isoformat(),
        "budget": script.budget,
        "scripted_messages": len(script.messages),
        "messages_by_kind": dict(sorted(by_why.items())),
        "messages_by_channel": dict(sorted(by_channel.items())),
        "messages_by_path": dict(sorted(by_via.items())),
        "presence_changes": len(presence),
        "surges": [{"team": s.team_id, "from_s": s.start, "to_s": s.end, "messages": s.messages} for s in script.surges],
        "opt_out_customer": script.opt_out.key if script.opt_out else None,
    }


def teams_open(directory: TeamDirectory, at: datetime) -> Iterable[tuple[str, bool]]:
    return ((t.id, is_open(t, at)) for t in sorted(directory.teams, key=lambda t: t.id))
