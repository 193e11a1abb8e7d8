"""The facts each lifecycle event contributes to the KPIs: pure, from the event alone (the
events carry what conversation-state knows of the customer's history)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.metrics.kpis import NO_AGENT, credit_of, facts_for
from shared.contracts import conversations as ev
from shared.contracts.common import Channel, Direction, PoolKind, RoutingReason
from shared.contracts.surveys import SurveyAnswered

T = datetime(2026, 11, 23, 9, 15, tzinfo=UTC)
IDS = {"conversation_id": "conv-1", "customer_id": "cus_1"}


def line(direction: Direction = Direction.INBOUND, team: str | None = "pnw", agent: str | None = "a-1", **kpi) -> ev.MessageAdded:
    return ev.MessageAdded(**IDS, message_id="m-1", direction=direction, channel=Channel.SMS, team_id=team, agent_id=agent, at=T, **kpi)


def assigned(**kpi) -> ev.ConversationAssigned:
    fields = {"pool": PoolKind.HOME_TEAM, "team_id": "pnw", "agent_id": "a-2", "reason": RoutingReason.LEAST_LOADED, "pool_reason": RoutingReason.HOME_TEAM}
    return ev.ConversationAssigned(**IDS, at=T, home_team_id="pnw", **{**fields, **kpi})


GROUPS = [
    ev.LinesBeforePlacement(at=T - timedelta(minutes=1), direction=Direction.INBOUND, channel=Channel.APP, lines=3, turns=1),
]


def brief(facts) -> list[tuple]:
    return [(f.counter, f.team, f.agent, f.amount) for f in facts]


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        # A line of a placed conversation: messages, and a turn only when it starts one.
        (line(), [("messages", "pnw", "a-1", 1.0), ("messages_inbound", "pnw", "a-1", 1.0)]),
        (line(starts_turn=True), [("messages", "pnw", "a-1", 1.0), ("messages_inbound", "pnw", "a-1", 1.0), ("turns", "pnw", "a-1", 1.0)]),
        (
            line(Direction.OUTBOUND, starts_turn=True, first_response_seconds=120.0),
            [
                ("messages", "pnw", "a-1", 1.0),
                ("messages_outbound", "pnw", "a-1", 1.0),
                ("turns", "pnw", "a-1", 1.0),
                ("first_response_count", "pnw", "a-1", 1.0),
                ("first_response_seconds", "pnw", "a-1", 120.0),
            ],
        ),
        (line(agent=None), [("messages", "pnw", NO_AGENT, 1.0), ("messages_inbound", "pnw", NO_AGENT, 1.0)]),
        # No team holds it: counted with the placement that follows, not now.
        (line(team=None, agent=None, starts_turn=True), []),
        # A placement counts the lines it takes over for its team and agent; the first one is "routed" for the home team.
        (
            assigned(first_placement=True, lines_before_placement=GROUPS),
            [
                ("messages", "pnw", "a-2", 3.0),
                ("messages_inbound", "pnw", "a-2", 3.0),
                ("turns", "pnw", "a-2", 1.0),
                ("routed", "pnw", NO_AGENT, 1.0),
            ],
        ),
        (assigned(), []),
        # Overflow to the standard pool: routed and overflow for the home team.
        (
            assigned(pool=PoolKind.STANDARD, team_id="standard", agent_id="std-1", pool_reason=RoutingReason.AFTER_HOURS, first_placement=True),
            [("routed", "pnw", NO_AGENT, 1.0), ("overflow_after_hours", "pnw", NO_AGENT, 1.0)],
        ),
        # A missed response target is the previous agent's.
        (assigned(reason=RoutingReason.RESPONSE_TARGET_MISSED, previous_agent_id="a-1"), [("response_target_missed", "pnw", "a-1", 1.0)]),
        (
            ev.ConversationQueued(**IDS, pool=PoolKind.HOME_TEAM, team_id="pnw", pool_reason=RoutingReason.HOME_TEAM, at=T, first_placement=True, lines_before_placement=GROUPS),
            [("messages", "pnw", NO_AGENT, 3.0), ("messages_inbound", "pnw", NO_AGENT, 3.0), ("turns", "pnw", NO_AGENT, 1.0), ("routed", "pnw", NO_AGENT, 1.0)],
        ),
        # Ends.
        (
            ev.ConversationResolved(**IDS, team_id="pnw", agent_id="a-1", resolved_at=T, opened_at=T - timedelta(minutes=10)),
            [("closed", "pnw", "a-1", 1.0), ("resolved", "pnw", "a-1", 1.0), ("resolution_count", "pnw", "a-1", 1.0), ("resolution_seconds", "pnw", "a-1", 600.0)],
        ),
        (ev.ConversationResolved(**IDS, team_id="pnw", agent_id="a-1", resolved_at=T), [("closed", "pnw", "a-1", 1.0), ("resolved", "pnw", "a-1", 1.0)]),
        (
            ev.ConversationClosed(**IDS, home_team_id="pnw", closed_at=T, lines_before_placement=GROUPS),
            [("messages", "pnw", NO_AGENT, 3.0), ("messages_inbound", "pnw", NO_AGENT, 3.0), ("turns", "pnw", NO_AGENT, 1.0), ("closed", "pnw", NO_AGENT, 1.0), ("closed_inactive", "pnw", NO_AGENT, 1.0)],
        ),
        # A repeat contact is the resolved conversation's team and agent's, in its hour.
        (
            ev.ConversationOpened(**IDS, home_team_id="pnw", channel=Channel.SMS, opened_at=T, repeat_of=ev.RepeatContact(conversation_id="conv-0", resolved_at=T - timedelta(days=2), team_id="standard", agent_id="std-1")),
            [("repeats", "standard", "std-1", 1.0)],
        ),
        (ev.ConversationOpened(**IDS, home_team_id="pnw", channel=Channel.SMS, opened_at=T), []),
        (ev.ConversationStatusChanged(**IDS, status="waiting_on_customer", at=T), []),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, list) else "",
)
def test_facts_of_an_event(event, expected) -> None:
    assert brief(facts_for(event)) == expected


def test_a_repeat_contact_is_counted_in_the_hour_of_the_resolution() -> None:
    resolved_at = T - timedelta(days=2, hours=3)
    opening = ev.ConversationOpened(**IDS, home_team_id="pnw", channel=Channel.SMS, opened_at=T, repeat_of=ev.RepeatContact(conversation_id="c0", resolved_at=resolved_at, team_id="pnw"))
    [fact] = facts_for(opening)
    assert (fact.at, fact.agent) == (resolved_at, NO_AGENT)


@pytest.mark.parametrize(
    ("credit", "team", "agent"),
    [(("pnw", "a-1"), "pnw", "a-1"), (None, "unknown", NO_AGENT)],
)
def test_a_survey_answer_goes_to_the_conversation_s_credit(credit, team, agent) -> None:
    survey = SurveyAnswered(survey_id="s-1", customer_id="cus_1", conversation_id="conv-1", score=4, answered_at=T)
    facts = facts_for(survey, credit)
    assert brief(facts) == [("csat_count", team, agent, 1.0), ("csat_sum", team, agent, 4.0)]
    assert facts[0].labels == (("score", "4"),)


@pytest.mark.parametrize(
    ("event", "credit"),
    [
        (assigned(), ("conv-1", ("pnw", "a-2"))),
        (ev.ConversationQueued(**IDS, pool=PoolKind.HOME_TEAM, team_id="pnw", pool_reason=RoutingReason.HOME_TEAM, at=T), ("conv-1", ("pnw", NO_AGENT))),
        (ev.ConversationResolved(**IDS, team_id="pnw", agent_id="a-1", resolved_at=T), ("conv-1", ("pnw", "a-1"))),
        (ev.ConversationClosed(**IDS, home_team_id="pnw", closed_at=T), ("conv-1", ("pnw", NO_AGENT))),
        (line(), None),
    ],
)
def test_who_holds_a_conversation(event, credit) -> None:
    assert credit_of(event) == credit
