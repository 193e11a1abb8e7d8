"""The messaging KPIs as pure arithmetic over lifecycle events (product brief, "Messaging KPIs").

Events become *facts* (a conversation closed, a line, a turn, a first response, a repeat
contact, ...), each attributed to a team (the pool that held the conversation), an agent and
an hour. What a fact needs to know of the customer's history (is this line a new turn, the
first response, the first placement, a repeat contact) the event itself says: conversation-
state, which holds that history, works it out. Facts are summed into hourly buckets; a
window's KPIs are ratios of the sums:

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
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from shared.contracts import conversations as ev
from shared.contracts.common import ConversationStatus, PoolKind, RoutingReason
from shared.contracts.surveys import SurveyAnswered

OVERFLOW_REASONS = (RoutingReason.AFTER_HOURS.value, RoutingReason.OPT_OUT.value, RoutingReason.SURGE.value)
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


# The team and agent a conversation's survey answers are credited to.
Credit = tuple[str, str]


def hour_of(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def facts_for(event: BaseModel, credit: Credit | None = None) -> list[Fact]:
    """The facts one event contributes. Events carry what the KPIs need (conversation-state
    works out turns, first responses, first placements, repeat contacts and the lines a team
    takes over from each customer's history), so this needs no memory of the customer. A
    survey answer is credited to the team and agent that held its conversation (``credit``,
    looked up by the caller)."""
    if isinstance(event, SurveyAnswered):
        team, agent = credit if credit is not None else ("unknown", NO_AGENT)
        return [
            Fact("csat_count", team, agent, event.answered_at, labels=(("score", str(event.score)),)),
            Fact("csat_sum", team, agent, event.answered_at, float(event.score)),
        ]
    if isinstance(event, ev.ConversationOpened):
        repeat = event.repeat_of
        return [] if repeat is None else [Fact("repeats", repeat.team_id, repeat.agent_id or NO_AGENT, repeat.resolved_at)]
    if isinstance(event, ev.MessageAdded):
        if event.team_id is None:
            return []  # no team holds the conversation: counted with the placement or ending that follows
        return _line_facts(event, event.team_id, event.agent_id or NO_AGENT)
    if isinstance(event, (ev.ConversationAssigned, ev.ConversationQueued)):
        agent = event.agent_id if isinstance(event, ev.ConversationAssigned) else NO_AGENT
        facts = _lines_before_placement(event.lines_before_placement, event.team_id, agent)
        home = event.home_team_id or event.team_id
        if event.first_placement:
            facts.append(Fact("routed", home, NO_AGENT, event.at, labels=(("pool", event.pool.value), ("reason", event.pool_reason.value))))
            if event.pool is PoolKind.STANDARD and event.pool_reason.value in OVERFLOW_REASONS:
                facts.append(Fact(f"overflow_{event.pool_reason.value}", home, NO_AGENT, event.at, labels=(("reason", event.pool_reason.value),)))
        if isinstance(event, ev.ConversationAssigned) and event.reason is RoutingReason.RESPONSE_TARGET_MISSED:
            facts.append(Fact("response_target_missed", event.team_id, event.previous_agent_id or NO_AGENT, event.at))
        return facts
    if isinstance(event, ev.ConversationResolved):
        team = event.team_id or event.home_team_id or "unknown"
        agent = event.agent_id or NO_AGENT
        facts = _lines_before_placement(event.lines_before_placement, team, NO_AGENT)
        facts += [
            Fact("closed", team, agent, event.resolved_at, labels=(("status", ConversationStatus.RESOLVED.value),)),
            Fact("resolved", team, agent, event.resolved_at),
        ]
        if event.opened_at is not None:
            facts += [
                Fact("resolution_count", team, agent, event.resolved_at),
                Fact("resolution_seconds", team, agent, event.resolved_at, max(0.0, (event.resolved_at - event.opened_at).total_seconds())),
            ]
        return facts
    if isinstance(event, ev.ConversationClosed):
        team = event.team_id or event.home_team_id or "unknown"
        agent = event.agent_id or NO_AGENT
        return _lines_before_placement(event.lines_before_placement, team, NO_AGENT) + [
            Fact("closed", team, agent, event.closed_at, labels=(("status", ConversationStatus.CLOSED_INACTIVE.value),)),
            Fact("closed_inactive", team, agent, event.closed_at),
        ]
    return []


def credit_of(event: BaseModel) -> tuple[str, Credit] | None:
    """(conversation, credit) when this event says who holds or held a conversation."""
    if isinstance(event, ev.ConversationAssigned):
        return event.conversation_id, (event.team_id, event.agent_id)
    if isinstance(event, ev.ConversationQueued):
        return event.conversation_id, (event.team_id, NO_AGENT)
    if isinstance(event, (ev.ConversationResolved, ev.ConversationClosed)):
        return event.conversation_id, (event.team_id or event.home_team_id or "unknown", event.agent_id or NO_AGENT)
    return None


def _line_facts(event: ev.MessageAdded, team: str, agent: str) -> list[Fact]:
    direction = event.direction.value
    facts = [
        Fact("messages", team, agent, event.at, labels=(("direction", direction), ("channel", event.channel.value))),
        Fact(f"messages_{direction}", team, agent, event.at),
    ]
    if event.starts_turn:
        facts.append(Fact("turns", team, agent, event.at))
    if event.first_response_seconds is not None:
        facts += [
            Fact("first_response_count", team, agent, event.at),
            Fact("first_response_seconds", team, agent, event.at, event.first_response_seconds),
        ]
    return facts


def _lines_before_placement(groups: Iterable[ev.LinesBeforePlacement], team: str, agent: str) -> list[Fact]:
    facts = []
    for g in groups:
        direction = g.direction.value
        facts += [
            Fact("messages", team, agent, g.at, g.lines, labels=(("direction", direction), ("channel", g.channel.value))),
            Fact(f"messages_{direction}", team, agent, g.at, g.lines),
        ]
        if g.turns:
            facts.append(Fact("turns", team, agent, g.at, g.turns))
    return facts


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
