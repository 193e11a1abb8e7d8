"""The messaging KPIs as pure arithmetic over lifecycle events (product brief, "Messaging KPIs").

Events become *facts* (a conversation closed, a line, a turn, a first response, a repeat
contact, ...), each attributed to a team (the pool that held the conversation), an agent and
an hour. Facts are summed into hourly buckets; a window's KPIs are ratios of the sums:

- closed conversations per staffed agent-hour (CCPH) = closed ÷ staffed hours
- cost per resolved contact (CPRC) = cost per agent-hour × staffed hours ÷ resolved
- lines per turn (LPT) = messages ÷ turns (a turn: a maximal run of messages by one side)
- repeat-contact rate = resolved conversations followed within 7 days by a new conversation
  of the same customer ÷ resolved
- overflow rate (by reason) = conversations placed in the standard pool by a rule ÷ all
  conversations placed for the first time
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from shared.contracts import conversations as ev
from shared.contracts.common import ConversationStatus, Direction, PoolKind, RoutingReason
from shared.contracts.surveys import SurveyAnswered

REPEAT_WINDOW = timedelta(days=7)
OVERFLOW_REASONS = (RoutingReason.AFTER_HOURS.value, RoutingReason.OPT_OUT.value, RoutingReason.SURGE.value)
MAX_TRACKED_CONVERSATIONS = 20
NO_AGENT = "-"

# Every counter a bucket holds.
COUNTERS = (
    "closed",
    "resolved",
    "closed_inactive",
    "messages",
    "messages_inbound",
    "messages_outbound",
    "turns",
    "first_response_count",
    "first_response_seconds",
    "resolution_count",
    "resolution_seconds",
    "routed",
    "overflow_after_hours",
    "overflow_opt_out",
    "overflow_surge",
    "repeats",
    "response_target_missed",
    "csat_count",
    "csat_sum",
)


@dataclass(frozen=True, slots=True)
class Fact:
    """One countable thing: add ``amount`` to ``counter`` of (team, agent) in ``at``'s hour."""

    counter: str
    team: str
    agent: str
    at: datetime
    amount: float = 1.0
    labels: tuple[tuple[str, str], ...] = ()  # extra bounded labels for Prometheus (channel, reason, ...)


@dataclass(slots=True)
class TrackedConversation:
    opened_at: datetime
    home_team: str
    team: str | None = None
    agent: str | None = None
    last_direction: str | None = None
    first_inbound_at: datetime | None = None
    responded: bool = False
    placed: bool = False
    # Facts of lines added before the conversation had a team (its first message comes
    # before routing): counted for the team that takes it, once it is placed.
    unplaced: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class CustomerKpiState:
    """What the metrics service remembers about one customer to derive facts."""

    conversations: dict[str, TrackedConversation] = field(default_factory=dict)
    last_resolved: dict[str, Any] | None = None  # {conversation_id, at, team, agent, repeat_counted}
    applied: dict[str, int] = field(default_factory=dict)
    # Ids of the customer's latest events: an event published again (conversation-state
    # repeats a batch's outputs, same ids, after a crash) is counted once.
    recent_ids: list[str] = field(default_factory=list)


RECENT_EVENT_IDS = 64


def seen_before(state: CustomerKpiState, event_id: str) -> bool:
    """Has this event been counted for the customer already? Remembers it if not."""
    if event_id in state.recent_ids:
        return True
    state.recent_ids.append(event_id)
    del state.recent_ids[:-RECENT_EVENT_IDS]
    return False


def hour_of(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def facts_for(event: BaseModel, state: CustomerKpiState) -> list[Fact]:
    """The facts one event contributes, updating the customer's tracking state."""
    if isinstance(event, ev.ConversationOpened):
        state.conversations[event.conversation_id] = TrackedConversation(opened_at=event.opened_at, home_team=event.home_team_id)
        _trim(state)
        last = state.last_resolved
        if (
            last is not None
            and not last.get("repeat_counted")
            and last["conversation_id"] != event.conversation_id
            and event.opened_at - last["at"] <= REPEAT_WINDOW
        ):
            last["repeat_counted"] = True
            return [Fact("repeats", last["team"], last["agent"], last["at"])]
        return []

    conv = state.conversations.get(getattr(event, "conversation_id", ""))
    if isinstance(event, SurveyAnswered):
        team = (conv.team if conv else None) or (conv.home_team if conv else "unknown")
        agent = (conv.agent if conv else None) or NO_AGENT
        return [
            Fact("csat_count", team, agent, event.answered_at, labels=(("score", str(event.score)),)),
            Fact("csat_sum", team, agent, event.answered_at, float(event.score)),
        ]
    if conv is None:
        return []  # a conversation opened before the metrics service started counting

    if isinstance(event, (ev.ConversationAssigned, ev.ConversationQueued)):
        facts = []
        reason = event.reason if isinstance(event, ev.ConversationAssigned) else None
        agent_now = event.agent_id if isinstance(event, ev.ConversationAssigned) else None
        facts.extend(_release_unplaced(conv, event.team_id, agent_now or NO_AGENT))
        if not conv.placed:
            conv.placed = True
            facts.append(Fact("routed", conv.home_team, NO_AGENT, event.at, labels=(("pool", event.pool.value), ("reason", event.pool_reason.value))))
            if event.pool is PoolKind.STANDARD and event.pool_reason.value in OVERFLOW_REASONS:
                facts.append(Fact(f"overflow_{event.pool_reason.value}", conv.home_team, NO_AGENT, event.at, labels=(("reason", event.pool_reason.value),)))
        if reason is RoutingReason.RESPONSE_TARGET_MISSED:
            facts.append(Fact("response_target_missed", event.team_id, conv.agent or NO_AGENT, event.at))
        conv.team = event.team_id
        conv.agent = event.agent_id if isinstance(event, ev.ConversationAssigned) else None
        return facts

    if isinstance(event, ev.MessageAdded):
        team = event.team_id or conv.team
        agent = event.agent_id or conv.agent or NO_AGENT
        if team is None:
            # Not placed yet: remember the line's facts for the team that takes it.
            facts = _message_facts(conv, event, "?", agent)
            # Labels as a mapping: FerretDB stores no arrays inside arrays.
            conv.unplaced.extend({"counter": f.counter, "at": f.at, "amount": f.amount, "labels": dict(f.labels)} for f in facts)
            return []
        return _message_facts(conv, event, team, agent)
    return _ended(event, conv, state)


def _message_facts(conv: TrackedConversation, event: ev.MessageAdded, team: str, agent: str) -> list[Fact]:
    direction = event.direction.value
    facts = [
        Fact("messages", team, agent, event.at, labels=(("direction", direction), ("channel", event.channel.value))),
        Fact(f"messages_{direction}", team, agent, event.at),
    ]
    if conv.last_direction != direction:
        facts.append(Fact("turns", team, agent, event.at))
        conv.last_direction = direction
    if event.direction is Direction.INBOUND and conv.first_inbound_at is None:
        conv.first_inbound_at = event.at
    if event.direction is Direction.OUTBOUND and not conv.responded:
        conv.responded = True
        start = conv.first_inbound_at or conv.opened_at
        facts += [
            Fact("first_response_count", team, agent, event.at),
            Fact("first_response_seconds", team, agent, event.at, max(0.0, (event.at - start).total_seconds())),
        ]
    return facts


def _release_unplaced(conv: TrackedConversation, team: str, agent: str) -> list[Fact]:
    facts = [Fact(f["counter"], team, agent, f["at"], f["amount"], tuple(f["labels"].items())) for f in conv.unplaced]
    conv.unplaced = []
    return facts


def _ended(event: BaseModel, conv: TrackedConversation, state: CustomerKpiState) -> list[Fact]:
    if isinstance(event, (ev.ConversationResolved, ev.ConversationClosed)):
        pending = _release_unplaced(conv, getattr(event, "team_id", None) or conv.team or conv.home_team, NO_AGENT)
    else:
        pending = []
    return pending + _end_facts(event, conv, state)


def _end_facts(event: BaseModel, conv: TrackedConversation, state: CustomerKpiState) -> list[Fact]:
    if isinstance(event, ev.ConversationResolved):
        team = event.team_id or conv.team or conv.home_team
        agent = event.agent_id or conv.agent or NO_AGENT
        state.last_resolved = {"conversation_id": event.conversation_id, "at": event.resolved_at, "team": team, "agent": agent, "repeat_counted": False}
        return [
            Fact("closed", team, agent, event.resolved_at, labels=(("status", ConversationStatus.RESOLVED.value),)),
            Fact("resolved", team, agent, event.resolved_at),
            Fact("resolution_count", team, agent, event.resolved_at),
            Fact("resolution_seconds", team, agent, event.resolved_at, max(0.0, (event.resolved_at - conv.opened_at).total_seconds())),
        ]

    if isinstance(event, ev.ConversationClosed):
        team = event.team_id or conv.team or conv.home_team
        agent = event.agent_id or conv.agent or NO_AGENT
        return [
            Fact("closed", team, agent, event.closed_at, labels=(("status", ConversationStatus.CLOSED_INACTIVE.value),)),
            Fact("closed_inactive", team, agent, event.closed_at),
        ]
    return []


def _trim(state: CustomerKpiState) -> None:
    if len(state.conversations) > MAX_TRACKED_CONVERSATIONS:
        oldest = sorted(state.conversations, key=lambda c: state.conversations[c].opened_at)
        for conv_id in oldest[: len(state.conversations) - MAX_TRACKED_CONVERSATIONS]:
            del state.conversations[conv_id]


def overlap_seconds(start: datetime, end: datetime | None, window_from: datetime, window_to: datetime, now: datetime) -> float:
    """Seconds of [start, end or now) inside [window_from, window_to)."""
    stop = min(end or now, window_to)
    begin = max(start, window_from)
    return max(0.0, (stop - begin).total_seconds())


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def summarize(sums: dict[str, float], staffed_seconds: float, cost_per_hour: float) -> dict[str, Any]:
    """The KPIs of one team or agent over a window, from its summed counters."""
    staffed_hours = staffed_seconds / 3600
    resolved = sums.get("resolved", 0)
    routed = sums.get("routed", 0)
    overflow = {r: sums.get(f"overflow_{r}", 0) for r in OVERFLOW_REASONS}
    csat_count = sums.get("csat_count", 0)
    return {
        "closed": sums.get("closed", 0),
        "resolved": resolved,
        "closed_inactive": sums.get("closed_inactive", 0),
        "staffed_hours": staffed_hours,
        "closed_per_staffed_hour": _ratio(sums.get("closed", 0), staffed_hours),
        "cost_per_resolved_contact": _ratio(cost_per_hour * staffed_hours, resolved),
        "messages": sums.get("messages", 0),
        "turns": sums.get("turns", 0),
        "lines_per_turn": _ratio(sums.get("messages", 0), sums.get("turns", 0)),
        "repeat_contacts": sums.get("repeats", 0),
        "repeat_contact_rate": _ratio(sums.get("repeats", 0), resolved),
        "first_response_seconds_avg": _ratio(sums.get("first_response_seconds", 0), sums.get("first_response_count", 0)),
        "resolution_seconds_avg": _ratio(sums.get("resolution_seconds", 0), sums.get("resolution_count", 0)),
        "routed": routed,
        "overflow": overflow,
        "overflow_rate": {r: _ratio(n, routed) for r, n in overflow.items()},
        "response_target_missed": sums.get("response_target_missed", 0),
        "csat_responses": csat_count,
        "csat_average": _ratio(sums.get("csat_sum", 0), csat_count),
    }


def add_facts(buckets: dict[tuple[datetime, str, str], dict[str, float]], facts: Iterable[Fact]) -> None:
    for fact in facts:
        key = (hour_of(fact.at), fact.team, fact.agent)
        counters = buckets.setdefault(key, {})
        counters[fact.counter] = counters.get(fact.counter, 0) + fact.amount
