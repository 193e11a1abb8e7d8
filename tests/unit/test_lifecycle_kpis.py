"""What the lifecycle events tell the KPIs: turns, first responses, first placements, the lines
a team takes over, repeat contacts. Conversation-state works these out from each customer's
history, so the metrics service only adds them up."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared.contracts import conversations as ev
from shared.contracts.common import Channel, Direction, RoutingReason
from tests.unit.test_lifecycle import (
    T0,
    assigned,
    decision,
    message,
    of,
    opened,
    reply,
    resolution,
    resolved,
    step,
)


@pytest.mark.parametrize(
    ("sides", "turns"),
    [
        ("c", [True]),
        ("cc", [True, False]),
        ("cca", [True, False, True]),
        ("ccacaa", [True, False, True, True, True, False]),
        ("cacac", [True, True, True, True, True]),
    ],
)
def test_a_line_starts_a_turn_when_the_other_side_wrote_last(sides: str, turns: list[bool]) -> None:
    records, conv = assigned()
    flags = [of(records_step.events, ev.MessageAdded)[0].starts_turn for records_step in _lines(records, conv, sides[1:])]
    first = True  # the opening message: the conversation's first line
    assert [first, *flags] == turns


def _lines(records, conv, sides):
    out = []
    for n, side in enumerate(sides, start=1):
        at = T0 + timedelta(minutes=n)
        if side == "c":
            out.append(step(records, message(f"p{n}", at)))
        else:
            out.append(step(records, reply(conv, at, action_id=f"act-{n}")))
    return out


def test_the_first_agent_line_carries_the_first_response_time_from_the_first_customer_message() -> None:
    records, conv = opened(T0)
    step(records, message("p2", T0 + timedelta(minutes=1)))
    step(records, decision(conv, T0 + timedelta(minutes=2), "sea-ana"))

    first = of(step(records, reply(conv, T0 + timedelta(minutes=5))).events, ev.MessageAdded)
    second = of(step(records, reply(conv, T0 + timedelta(minutes=6), action_id="act-2")).events, ev.MessageAdded)

    assert [m.first_response_seconds for m in first + second] == [300.0, None]


def test_customer_lines_never_carry_a_first_response() -> None:
    records, conv = assigned()
    line = of(step(records, message("p2", T0 + timedelta(minutes=1))).events, ev.MessageAdded)[0]
    assert line.direction is Direction.INBOUND and line.first_response_seconds is None


def test_lines_before_the_first_placement_travel_with_it_once() -> None:
    records, conv = opened(T0)
    before = of(step(records, message("p2", T0 + timedelta(minutes=1), Channel.APP)).events, ev.MessageAdded)[0]
    assert before.team_id is None  # no team holds it yet: counted with the placement

    placed = of(step(records, decision(conv, T0 + timedelta(minutes=2), "sea-ana")).events, ev.ConversationAssigned)[0]

    assert placed.first_placement is True
    assert placed.home_team_id == "pnw" and placed.previous_agent_id is None
    assert [(g.direction, g.channel, g.lines, g.turns, g.at) for g in placed.lines_before_placement] == [
        (Direction.INBOUND, Channel.SMS, 1, 1, T0),
        (Direction.INBOUND, Channel.APP, 1, 0, T0 + timedelta(minutes=1)),
    ]
    # A later line has a team; a later placement (a move to a teammate) is not the first and carries nothing.
    after = of(step(records, message("p3", T0 + timedelta(minutes=3))).events, ev.MessageAdded)[0]
    assert after.team_id == "pnw"
    moved = of(step(records, decision(conv, T0 + timedelta(minutes=4), "sea-ben", decision_id="dec-2")).events, ev.ConversationAssigned)[0]
    assert (moved.first_placement, moved.previous_agent_id, moved.lines_before_placement) == (False, "sea-ana", [])


def test_lines_before_placement_are_grouped_by_hour_direction_and_channel() -> None:
    records, conv = opened(T0)  # 17:00
    for n, minutes in enumerate((10, 20, 70), start=2):  # 17:10, 17:20, 18:10
        step(records, message(f"p{n}", T0 + timedelta(minutes=minutes)))

    placed = of(step(records, decision(conv, T0 + timedelta(minutes=80), None)).events, ev.ConversationQueued)[0]

    assert placed.first_placement is True
    assert [(g.at, g.lines, g.turns) for g in placed.lines_before_placement] == [(T0, 3, 1), (T0 + timedelta(minutes=70), 1, 0)]


def test_a_reopened_conversation_is_not_placed_for_the_first_time_again() -> None:
    records, conv = resolved(T0)
    reopened = step(records, message("p9", T0 + timedelta(minutes=20)))  # within the reopen window
    assert of(reopened.events, ev.ConversationOpened) == []
    assert of(reopened.events, ev.MessageAdded)[0].team_id is None  # held until it is placed again

    placed = of(step(records, decision(conv, T0 + timedelta(minutes=21), "sea-ana", decision_id="dec-9")).events, ev.ConversationAssigned)[0]

    assert placed.first_placement is False
    assert [(g.lines, g.turns) for g in placed.lines_before_placement] == [(1, 1)]


@pytest.mark.parametrize(
    ("after", "repeat"),
    [
        (timedelta(hours=2), True),  # past the reopen window: a new conversation
        (timedelta(days=6, hours=23), True),
        (timedelta(days=7, minutes=6), False),
    ],
)
def test_a_new_conversation_within_7_days_of_a_resolution_is_a_repeat_contact(after: timedelta, repeat: bool) -> None:
    records, first = resolved(T0)  # resolved at T0 + 5 min by sea-ana of pnw
    resolved_at = T0 + timedelta(minutes=5)

    opening = of(step(records, message("again", resolved_at + after)).events, ev.ConversationOpened)[0]

    expected = ev.RepeatContact(conversation_id=first, resolved_at=resolved_at, team_id="pnw", agent_id="sea-ana") if repeat else None
    assert opening.repeat_of == expected


def test_only_the_first_conversation_after_a_resolution_repeats_it() -> None:
    records, _ = resolved(T0)
    second = of(step(records, message("again", T0 + timedelta(hours=2))).events, ev.ConversationOpened)[0]
    conv2 = second.conversation_id
    step(records, decision(conv2, T0 + timedelta(hours=2, seconds=1), "sea-ana", decision_id="dec-2"))
    step(records, reply(conv2, T0 + timedelta(hours=2, minutes=1), action_id="act-r2"))
    closed = step(records, resolution(conv2, T0 + timedelta(hours=2, minutes=2)))
    assert of(closed.events, ev.ConversationResolved)[0].opened_at == T0 + timedelta(hours=2)

    third = of(step(records, message("third", T0 + timedelta(hours=5))).events, ev.ConversationOpened)[0]

    assert second.repeat_of is not None and third.repeat_of is not None
    assert third.repeat_of.conversation_id == conv2  # the latest resolution, counted once each


def test_a_missed_response_target_names_the_agent_who_missed_it() -> None:
    records, conv = assigned()
    offer = decision(conv, T0 + timedelta(minutes=10), "sea-ben", decision_id="dec-offer")
    offer = offer.model_copy(update={"reason": RoutingReason.RESPONSE_TARGET_MISSED})
    moved = of(step(records, offer).events, ev.ConversationAssigned)[0]
    assert (moved.reason, moved.previous_agent_id, moved.agent_id) == (RoutingReason.RESPONSE_TARGET_MISSED, "sea-ana", "sea-ben")
