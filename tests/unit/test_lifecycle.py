"""The conversation lifecycle: pure transitions over one customer's records.

Scenarios are built step by step from plain payloads with explicit instants; every step gets
its own ``Effects`` and the test looks at exactly what that step produced.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from pydantic import BaseModel

from services.conversation_state import lifecycle
from services.conversation_state.lifecycle import CustomerRecords, Effects, Rules
from shared.contracts import conversations as ev
from shared.contracts.agents import ReplyToCustomer, ResolveConversation, TransferConversation
from shared.contracts.common import Channel, ConversationStatus, Direction, PoolKind, RoutingReason, WaitingOn
from shared.contracts.customers import OptInToHomeTeam, OptOutOfHomeTeam, ReassignHomeTeam
from shared.contracts.lifecycle import CloseInactiveConversation
from shared.contracts.messages import CustomerMessageReceived
from shared.contracts.routing import (
    STANDARD_POOL_ID,
    ChangeConversationWeight,
    ConversationRouted,
    MoveToTeammate,
    ReleaseConversation,
    RouteConversation,
)
from shared.teams import parse_directory

M = TypeVar("M", bound=BaseModel)

DIRECTORY = parse_directory(
    {
        "default_team": "midwest",
        "standard_pool": {"agents": [{"id": "std-avery", "max_concurrency": 8}]},
        "teams": [
            {
                "id": "pnw",
                "name": "Pacific Northwest",
                "timezone": "America/Los_Angeles",
                "regions": {"zip_prefixes": ["980", "981"], "area_codes": ["206"], "markets": ["seattle"]},
                "hours": {"mon": ["08:00-20:00"]},
                "agents": [{"id": "sea-ana", "max_concurrency": 6}, {"id": "sea-ben", "max_concurrency": 6}],
            },
            {
                "id": "midwest",
                "name": "Midwest",
                "timezone": "America/Chicago",
                "regions": {"zip_prefixes": ["606"], "area_codes": ["312"], "markets": ["chicago"]},
                "hours": {"mon": ["08:00-20:00"]},
                "agents": [{"id": "chi-eve", "max_concurrency": 6}],
            },
            {
                "id": "northeast",
                "name": "Northeast",
                "timezone": "America/New_York",
                "regions": {"zip_prefixes": ["100"], "area_codes": ["212"], "markets": ["new-york"]},
                "hours": {"mon": ["08:00-20:00"]},
                "agents": [{"id": "nyc-hana", "max_concurrency": 6}],
            },
        ],
    }
)
REOPEN_WINDOW = timedelta(hours=1)
RULES = Rules(DIRECTORY, reopen_window=REOPEN_WINDOW)

T0 = datetime(2026, 3, 2, 17, 0, tzinfo=UTC)
CUSTOMER = "cus_1"
PHONE = "+12065550100"
CHAT_SOURCE = "urn:chat:src-9f8e"
APP_ACCOUNT = "acct-42"
ADDRESSES = {Channel.SMS: PHONE, Channel.BUSINESS_CHAT: CHAT_SOURCE, Channel.APP: APP_ACCOUNT}
BUSINESS_IDS = {Channel.SMS: "tel-18005550199", Channel.BUSINESS_CHAT: "biz-acme", Channel.APP: None}


# --- builders (plain functions, no fixtures) -------------------------------------------------


def message(
    provider_id: str,
    at: datetime,
    channel: Channel = Channel.SMS,
    *,
    address: str | None = None,
    zip_code: str | None = None,
    market: str | None = None,
    authenticated: bool = False,
    customer_id: str = CUSTOMER,
    text: str = "my phone has no signal",
) -> CustomerMessageReceived:
    region = {k: v for k, v in (("zip", zip_code), ("market", market)) if v}
    return CustomerMessageReceived(
        message_id=f"msg-{channel.value}-{provider_id}",
        customer_id=customer_id,
        channel=channel,
        address=address or ADDRESSES[channel],
        provider_message_id=provider_id,
        text=text,
        sent_at=at,
        received_at=at,
        business_id=BUSINESS_IDS[channel],
        authenticated=authenticated,
        region=region,
    )


def decision(
    conversation_id: str,
    at: datetime,
    agent_id: str | None,
    *,
    team_id: str = "pnw",
    pool: PoolKind | None = None,
    decision_id: str = "dec-1",
) -> ConversationRouted:
    if pool is None:
        pool = PoolKind.STANDARD if team_id == STANDARD_POOL_ID else PoolKind.HOME_TEAM
    return ConversationRouted(
        decision_id=decision_id,
        conversation_id=conversation_id,
        customer_id=CUSTOMER,
        pool=pool,
        team_id=team_id,
        agent_id=agent_id,
        reason=RoutingReason.LEAST_LOADED if agent_id else RoutingReason.QUEUED,
        pool_reason=RoutingReason.HOME_TEAM if pool is PoolKind.HOME_TEAM else RoutingReason.AFTER_HOURS,
        queue_position=None if agent_id else 1,
        decided_at=at,
    )


def reply(conversation_id: str, at: datetime, agent_id: str = "sea-ana", action_id: str = "act-reply-1") -> ReplyToCustomer:
    return ReplyToCustomer(
        action_id=action_id,
        customer_id=CUSTOMER,
        conversation_id=conversation_id,
        agent_id=agent_id,
        text="Let me check the towers near you.",
        sent_at=at,
    )


def resolution(conversation_id: str, at: datetime, agent_id: str = "sea-ana") -> ResolveConversation:
    return ResolveConversation(
        action_id="act-resolve-1", customer_id=CUSTOMER, conversation_id=conversation_id, agent_id=agent_id, resolved_at=at
    )


def transfer_to(conversation_id: str, at: datetime, agent_id: str = "sea-ana", to: str = "sea-ben") -> TransferConversation:
    return TransferConversation(
        action_id="act-transfer-1",
        customer_id=CUSTOMER,
        conversation_id=conversation_id,
        agent_id=agent_id,
        to_agent_id=to,
        requested_at=at,
    )


def _input_id(payload: BaseModel) -> str:
    for name in ("message_id", "decision_id", "action_id", "command_id"):
        if hasattr(payload, name):
            return f"in-{getattr(payload, name)}"
    raise TypeError(type(payload))


def step(records: CustomerRecords, payload: BaseModel) -> Effects:
    """Apply one input the way the handler does (then remember it as applied), with its own
    Effects."""
    fx = Effects(_input_id(payload))
    if isinstance(payload, CustomerMessageReceived):
        lifecycle.customer_message(records, payload, RULES, fx)
    elif isinstance(payload, ConversationRouted):
        lifecycle.routed(records, payload, fx)
    elif isinstance(payload, ReplyToCustomer):
        lifecycle.agent_reply(records, payload, RULES, fx)
    elif isinstance(payload, ResolveConversation):
        lifecycle.resolve(records, payload, fx)
    elif isinstance(payload, TransferConversation):
        lifecycle.transfer(records, payload, fx)
    elif isinstance(payload, OptOutOfHomeTeam | OptInToHomeTeam | ReassignHomeTeam):
        lifecycle.customer_command(records, payload, RULES, fx)
    else:
        raise TypeError(type(payload))
    lifecycle.remember_applied(records, payload, T0)
    return fx


def of(items: list[Any], kind: type[M]) -> list[M]:
    return [i for i in items if isinstance(i, kind)]


def routing_of(fx: Effects, kind: type[M]) -> list[tuple[str, M]]:
    return [(key, cmd) for key, cmd in fx.routing if isinstance(cmd, kind)]


def opened(at: datetime = T0, channel: Channel = Channel.SMS) -> tuple[CustomerRecords, str]:
    """A new customer's first message: the records and the new conversation's id."""
    records = CustomerRecords(customer=None)
    step(records, message("first", at, channel))
    assert records.customer is not None and records.customer.open_conversation_id is not None
    return records, records.customer.open_conversation_id


def assigned(at: datetime = T0, agent: str = "sea-ana") -> tuple[CustomerRecords, str]:
    records, conv_id = opened(at)
    step(records, decision(conv_id, at + timedelta(seconds=1), agent))
    return records, conv_id


def replied(at: datetime = T0, agent: str = "sea-ana") -> tuple[CustomerRecords, str]:
    records, conv_id = assigned(at, agent)
    step(records, reply(conv_id, at + timedelta(minutes=2), agent))
    return records, conv_id


def resolved(at: datetime = T0) -> tuple[CustomerRecords, str]:
    records, conv_id = replied(at)
    step(records, resolution(conv_id, at + timedelta(minutes=5)))
    return records, conv_id


# --- first contact ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "address", "zip_code", "market", "team", "source"),
    [
        (Channel.BUSINESS_CHAT, CHAT_SOURCE, "98101", None, "pnw", "zip"),
        (Channel.BUSINESS_CHAT, CHAT_SOURCE, "60614-1234", None, "midwest", "zip"),
        (Channel.SMS, "+12125550100", None, None, "northeast", "area_code"),
        (Channel.SMS, "+12065550100", None, None, "pnw", "area_code"),
        (Channel.APP, APP_ACCOUNT, None, "chicago", "midwest", "market"),
        # An explicit market wins over a ZIP, and a ZIP over the phone's area code.
        (Channel.APP, APP_ACCOUNT, "98101", "new-york", "northeast", "market"),
        (Channel.SMS, "+13125550100", "10001", None, "northeast", "zip"),
        # Nothing matches: the default team.
        (Channel.SMS, "+14155550100", None, None, "midwest", "default"),
        (Channel.SMS, "+14155550100", "33101", None, "midwest", "default"),
        (Channel.APP, APP_ACCOUNT, None, None, "midwest", "default"),
    ],
)
def test_first_message_assigns_home_team_by_region(channel, address, zip_code, market, team, source):
    records = CustomerRecords(customer=None)

    fx = step(records, message("p1", T0, channel, address=address, zip_code=zip_code, market=market))

    customer = records.customer
    assert customer is not None
    assert (customer.id, customer.home_team_id, customer.home_team_source) == (CUSTOMER, team, source)
    assert [e.home_team_id for e in of(fx.events, ev.ConversationOpened)] == [team]
    assert [(key, cmd.home_team_id) for key, cmd in routing_of(fx, RouteConversation)] == [(team, team)]


def test_first_message_opens_a_conversation_waiting_on_the_agent():
    records = CustomerRecords(customer=None)
    msg = message("p1", T0, Channel.SMS, zip_code="98101")

    fx = step(records, msg)

    customer = records.customer
    assert customer is not None
    conv = records.open_conversation
    assert conv is not None
    assert customer.open_conversation_id == customer.last_conversation_id == conv.id
    assert (conv.status, conv.home_team_id, conv.last_channel) == (ConversationStatus.WAITING_ON_AGENT, "pnw", Channel.SMS)
    assert (conv.opened_at, conv.waiting_since, conv.last_customer_message_at, conv.inbound_count) == (T0, T0, T0, 1)
    assert [type(e) for e in fx.events] == [ev.ConversationOpened, ev.MessageAdded]
    opened_event, added = fx.events
    assert opened_event == ev.ConversationOpened(
        conversation_id=conv.id, customer_id=CUSTOMER, home_team_id="pnw", channel=Channel.SMS, opened_at=T0
    )
    assert (added.conversation_id, added.message_id, added.direction, added.channel) == (
        conv.id,
        msg.message_id,
        Direction.INBOUND,
        Channel.SMS,
    )
    [(key, route)] = fx.routing
    assert key == "pnw"
    assert isinstance(route, RouteConversation)
    assert (route.conversation_id, route.customer_id, route.channel, route.waiting_on, route.requested_at) == (
        conv.id,
        CUSTOMER,
        Channel.SMS,
        WaitingOn.AGENT,
        T0,
    )
    assert (route.opted_out, route.current_agent_id, route.known_agent_id) == (False, None, None)
    [line] = fx.lines
    assert (line.message_id, line.conversation_id, line.direction, line.text) == (
        msg.message_id,
        conv.id,
        Direction.INBOUND,
        msg.text,
    )
    assert fx.deliveries == []


def test_home_team_is_sticky_whatever_later_messages_say_about_the_region():
    records, _ = opened()  # first contact from a 206 number: pnw
    fx = step(records, message("p2", T0 + timedelta(minutes=1), Channel.APP, zip_code="10001", market="new-york"))

    assert records.customer is not None
    assert (records.customer.home_team_id, records.customer.home_team_source) == ("pnw", "area_code")
    assert of(fx.events, ev.CustomerPreferencesChanged) == []


# --- one conversation across channels --------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (Channel.SMS, Channel.APP),
        (Channel.SMS, Channel.BUSINESS_CHAT),
        (Channel.BUSINESS_CHAT, Channel.SMS),
        (Channel.APP, Channel.SMS),
        (Channel.SMS, Channel.SMS),
    ],
)
def test_second_message_joins_the_open_conversation_on_any_channel(first, second):
    records, conv_id = opened(channel=first)
    later = T0 + timedelta(minutes=3)

    fx = step(records, message("p2", later, second))

    assert list(records.conversations) == [conv_id]
    assert of(fx.events, ev.ConversationOpened) == []
    assert fx.routing == []  # already waiting for routing: no second route request
    [added] = of(fx.events, ev.MessageAdded)
    assert (added.conversation_id, added.channel) == (conv_id, second)
    conv = records.conversations[conv_id]
    assert records.customer is not None
    assert (conv.last_channel, records.customer.last_channel) == (second, second)
    assert (conv.inbound_count, conv.last_customer_message_at) == (2, later)
    assert records.customer.addresses == {first.value: ADDRESSES[first], second.value: ADDRESSES[second]}


def _stored_before_positions() -> tuple[CustomerRecords, str]:
    records, conv_id = opened()
    records.conversations[conv_id].line_count = None  # as read from a document without one
    return records, conv_id


@pytest.mark.parametrize(
    ("setup", "count_before", "position"),
    [
        (opened, 1, 2),
        (replied, 2, 3),
        (resolved, 2, 3),  # within the reopen window: the same conversation goes on
        (_stored_before_positions, None, None),  # its lines stay stored by message id
    ],
)
def test_each_line_takes_the_next_position_in_its_conversation(setup, count_before, position):
    records, conv_id = setup()
    conv = records.conversations[conv_id]
    assert conv.line_count == count_before

    fx = step(records, message("again", T0 + timedelta(minutes=6)))

    [line] = fx.lines
    assert (line.conversation_id, line.seq, conv.line_count) == (conv_id, position, position)
    assert line.to_doc()["_id"] == (f"{conv_id}|{position}" if position is not None else line.message_id)
    assert line.to_doc()["message_id"] == line.message_id


@pytest.mark.parametrize(
    ("seen", "incoming", "expected"),
    [
        ([("p1", Channel.SMS)], ("p1", Channel.SMS), True),
        ([("p1", Channel.SMS), ("p2", Channel.APP)], ("p1", Channel.SMS), True),
        ([("p1", Channel.SMS)], ("p2", Channel.SMS), False),
        # The same provider id on another channel is another message.
        ([("p1", Channel.SMS)], ("p1", Channel.APP), False),
        ([], ("p1", Channel.SMS), False),  # unknown customer
    ],
)
def test_already_received_recognises_a_redelivered_message(seen, incoming, expected):
    records = CustomerRecords(customer=None)
    for i, (provider_id, channel) in enumerate(seen):
        step(records, message(provider_id, T0 + timedelta(seconds=i), channel))

    # The provider's retry arrives later with the same ids (received_at differs).
    again = message(incoming[0], T0 + timedelta(hours=1), incoming[1])
    assert lifecycle.already_received(records, again) is expected


@pytest.mark.parametrize(
    ("repeat", "expected"),
    [
        (lambda conv_id: reply(conv_id, T0 + timedelta(minutes=2)), True),  # the desktop resent it
        (lambda conv_id: reply(conv_id, T0 + timedelta(minutes=2), action_id="act-reply-2"), False),
        (lambda conv_id: decision(conv_id, T0 + timedelta(seconds=1), "sea-ana"), True),  # republished
        (lambda conv_id: decision(conv_id, T0 + timedelta(seconds=1), "sea-ana", decision_id="dec-2"), False),
    ],
)
def test_already_applied_recognises_a_repeated_action_or_decision(repeat, expected):
    records, conv_id = replied()  # applied dec-1 and act-reply-1

    assert lifecycle.already_applied(records, repeat(conv_id)) is expected


# --- routing decisions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("agent", "team", "pool", "event_type"),
    [
        ("sea-ana", "pnw", PoolKind.HOME_TEAM, ev.ConversationAssigned),
        (None, "pnw", PoolKind.HOME_TEAM, ev.ConversationQueued),
        ("std-avery", STANDARD_POOL_ID, PoolKind.STANDARD, ev.ConversationAssigned),
        (None, STANDARD_POOL_ID, PoolKind.STANDARD, ev.ConversationQueued),
    ],
)
def test_routing_decision_records_the_placement(agent, team, pool, event_type):
    records, conv_id = opened()
    at = T0 + timedelta(seconds=2)

    fx = step(records, decision(conv_id, at, agent, team_id=team, pool=pool))

    conv = records.conversations[conv_id]
    assert (conv.agent_id, conv.team_id, conv.pool) == (agent, team, pool)
    assert [type(e) for e in fx.events] == [event_type]
    [event] = fx.events
    assert (event.conversation_id, event.team_id, event.pool, event.at) == (conv_id, team, pool, at)
    if agent is None:
        assert (event.queue_position, conv.queued_at, conv.assigned_at) == (1, at, None)
    else:
        assert (event.agent_id, conv.assigned_at, conv.queued_at) == (agent, at, None)
    assert fx.routing == []
    assert conv.status is ConversationStatus.WAITING_ON_AGENT


def close_command(records: CustomerRecords, conv_id: str, deadline: datetime | None = None) -> CloseInactiveConversation:
    """The sweeper's command for the conversation's current deadline (or the one given)."""
    deadline = deadline or records.conversations[conv_id].inactive_after or T0
    return CloseInactiveConversation(command_id="sweep", customer_id=CUSTOMER, conversation_id=conv_id, deadline=deadline)


def _closed_records() -> tuple[CustomerRecords, str]:
    records, conv_id = replied()
    fx = Effects("sweep-1")
    lifecycle.close_inactive(records, close_command(records, conv_id), fx)
    assert records.conversations[conv_id].status is ConversationStatus.CLOSED_INACTIVE
    return records, conv_id


def _unknown_conversation() -> tuple[CustomerRecords, str]:
    records, _ = opened()
    return records, "conv-that-is-not-here"


@pytest.mark.parametrize(
    ("setup", "team"),
    [
        (resolved, "pnw"),
        (_closed_records, "pnw"),
        (_closed_records, STANDARD_POOL_ID),
        (_unknown_conversation, "northeast"),
    ],
)
def test_decision_for_a_conversation_no_longer_open_is_released_back_to_that_pool(setup, team):
    records, conv_id = setup()
    before = records.conversations.get(conv_id)
    before_agent = before.agent_id if before else None
    at = T0 + timedelta(hours=3)

    fx = step(records, decision(conv_id, at, "sea-ben", team_id=team, decision_id="dec-late"))

    [(key, release)] = fx.routing
    assert key == team
    assert isinstance(release, ReleaseConversation)
    assert (release.conversation_id, release.customer_id, release.released_at) == (conv_id, CUSTOMER, at)
    assert fx.events == []
    if before is not None:
        assert records.conversations[conv_id].agent_id == before_agent
        assert not records.conversations[conv_id].is_open


# --- agent replies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channels", "reply_channel"),
    [
        ([Channel.SMS], Channel.SMS),
        ([Channel.SMS, Channel.BUSINESS_CHAT], Channel.BUSINESS_CHAT),
        ([Channel.SMS, Channel.APP], Channel.APP),
        ([Channel.APP, Channel.SMS], Channel.SMS),
        ([Channel.SMS, Channel.BUSINESS_CHAT, Channel.SMS], Channel.SMS),
    ],
)
def test_reply_by_the_assignee_goes_out_on_the_channel_the_customer_last_used(channels, reply_channel):
    records = CustomerRecords(customer=None)
    for i, channel in enumerate(channels):
        step(records, message(f"p{i}", T0 + timedelta(minutes=i), channel))
    assert records.customer is not None
    conv_id = records.customer.open_conversation_id
    assert conv_id is not None
    step(records, decision(conv_id, T0 + timedelta(minutes=10), "sea-ana"))
    at = T0 + timedelta(minutes=12)
    action = reply(conv_id, at)

    fx = step(records, action)

    [delivery] = fx.deliveries
    assert (delivery.channel, delivery.address, delivery.business_id) == (
        reply_channel,
        ADDRESSES[reply_channel],
        BUSINESS_IDS[reply_channel],
    )
    assert (delivery.customer_id, delivery.conversation_id, delivery.agent_id, delivery.text, delivery.requested_at) == (
        CUSTOMER,
        conv_id,
        "sea-ana",
        action.text,
        at,
    )
    [line] = fx.lines
    assert (line.message_id, line.direction, line.channel, line.agent_id) == (
        delivery.delivery_id,
        Direction.OUTBOUND,
        reply_channel,
        "sea-ana",
    )


def test_reply_makes_the_conversation_wait_on_the_customer_and_the_agent_known():
    records, conv_id = assigned()
    at = T0 + timedelta(minutes=2)

    fx = step(records, reply(conv_id, at))

    conv = records.conversations[conv_id]
    customer = records.customer
    assert customer is not None
    assert (conv.status, conv.waiting_since, conv.first_response_at, conv.last_agent_message_at) == (
        ConversationStatus.WAITING_ON_CUSTOMER,
        at,
        at,
        at,
    )
    assert (customer.known_agent_id, customer.known_agent_served_at) == ("sea-ana", at)
    assert [type(e) for e in fx.events] == [ev.MessageAdded, ev.ConversationStatusChanged]
    assert fx.events[1].status is ConversationStatus.WAITING_ON_CUSTOMER
    [(key, weight)] = fx.routing
    assert key == "pnw"
    assert isinstance(weight, ChangeConversationWeight)
    assert (weight.conversation_id, weight.waiting_on, weight.changed_at) == (conv_id, WaitingOn.CUSTOMER, at)


def test_second_reply_in_a_row_keeps_status_and_weight_but_moves_the_inactivity_deadline():
    records, conv_id = replied()
    at = T0 + timedelta(minutes=3)
    before = records.conversations[conv_id].inactive_after

    fx = step(records, reply(conv_id, at, action_id="act-reply-2"))

    assert len(fx.deliveries) == 1
    assert fx.routing == []
    [status] = of(fx.events, ev.ConversationStatusChanged)
    assert status.status is ConversationStatus.WAITING_ON_CUSTOMER
    assert status.inactive_after == before + timedelta(minutes=1)
    conv = records.conversations[conv_id]
    assert (conv.outbound_count, conv.first_response_at, conv.last_agent_message_at) == (
        2,
        T0 + timedelta(minutes=2),
        at,
    )


def _other_customers_conversation(records: CustomerRecords, conv_id: str) -> str:
    records.conversations[conv_id].customer_id = "cus_someone_else"
    return conv_id


@pytest.mark.parametrize(
    ("setup", "build", "agent", "reason"),
    [
        (assigned, reply, "sea-ben", "not_assignee"),
        (opened, reply, "sea-ana", "not_assignee"),  # still queued: nobody's yet
        (resolved, reply, "sea-ana", "conversation_not_open"),
        (_closed_records, reply, "sea-ana", "conversation_not_open"),
        (assigned, resolution, "sea-ben", "not_assignee"),
        (resolved, resolution, "sea-ana", "conversation_not_open"),
        (assigned, transfer_to, "sea-ben", "not_assignee"),
        (resolved, transfer_to, "sea-ana", "conversation_not_open"),
    ],
)
def test_agent_action_that_is_not_allowed_is_rejected_with_a_reason(setup, build, agent, reason):
    records, conv_id = setup()
    status_before = records.conversations[conv_id].status
    action = build(conv_id, T0 + timedelta(hours=4), agent_id=agent)

    fx = step(records, action)

    assert fx.events == [
        ev.CommandRejected(
            command_id=action.action_id,
            command_type=type(action).__name__,
            customer_id=CUSTOMER,
            conversation_id=conv_id,
            agent_id=agent,
            reason=reason,
            at=T0 + timedelta(hours=4),
        )
    ]
    assert (fx.deliveries, fx.lines, fx.routing) == ([], [], [])
    assert records.conversations[conv_id].status is status_before


@pytest.mark.parametrize("build", [reply, resolution, transfer_to])
@pytest.mark.parametrize("make_unknown", ["missing_conversation", "other_customer", "no_customer"])
def test_agent_action_on_an_unknown_conversation_is_rejected(build, make_unknown):
    if make_unknown == "no_customer":
        records, conv_id = CustomerRecords(customer=None), "conv-x"
    else:
        records, conv_id = assigned()
        if make_unknown == "missing_conversation":
            conv_id = "conv-x"
        else:
            _other_customers_conversation(records, conv_id)

    fx = step(records, build(conv_id, T0 + timedelta(minutes=5)))

    assert [(type(e), e.reason) for e in fx.events] == [(ev.CommandRejected, "unknown_conversation")]
    assert (fx.deliveries, fx.lines, fx.routing) == ([], [], [])


def test_customer_message_after_a_reply_puts_the_conversation_back_on_the_agent():
    records, conv_id = replied()  # the agent replied at T0 + 2 min
    at = T0 + timedelta(minutes=9, seconds=30)

    fx = step(records, message("p2", at, Channel.APP))

    conv = records.conversations[conv_id]
    assert records.customer is not None
    assert (conv.status, conv.waiting_since) == (ConversationStatus.WAITING_ON_AGENT, at)
    assert list(records.customer.reply_gaps_s) == [450.0]
    assert routing_of(fx, RouteConversation) == []  # the assignee keeps it
    [(key, weight)] = routing_of(fx, ChangeConversationWeight)
    assert key == "pnw"
    assert (weight.waiting_on, weight.changed_at) == (WaitingOn.AGENT, at)
    [changed] = of(fx.events, ev.ConversationStatusChanged)
    assert changed.status is ConversationStatus.WAITING_ON_AGENT
    [added] = of(fx.events, ev.MessageAdded)
    assert (added.agent_id, added.team_id) == ("sea-ana", "pnw")


# --- ending and reopening ----------------------------------------------------------------------


def test_resolve_ends_the_conversation_and_frees_the_agent():
    records, conv_id = replied()
    at = T0 + timedelta(minutes=5)

    fx = step(records, resolution(conv_id, at))

    conv = records.conversations[conv_id]
    assert records.customer is not None
    assert records.customer.open_conversation_id is None
    assert records.customer.last_conversation_id == conv_id
    assert (conv.status, conv.resolved_at) == (ConversationStatus.RESOLVED, at)
    assert of(fx.events, ev.ConversationResolved) == [
        ev.ConversationResolved(
            conversation_id=conv_id, customer_id=CUSTOMER, team_id="pnw", agent_id="sea-ana", resolved_at=at, home_team_id="pnw", opened_at=conv.opened_at
        )
    ]
    [(key, release)] = fx.routing
    assert key == "pnw"
    assert isinstance(release, ReleaseConversation)
    assert (release.conversation_id, release.released_at) == (conv_id, at)


@pytest.mark.parametrize(
    "after",
    [timedelta(seconds=1), timedelta(minutes=59), REOPEN_WINDOW],
)
def test_message_within_the_reopen_window_reopens_the_resolved_conversation(after):
    records, conv_id = resolved()  # resolved at T0 + 5 min by sea-ana
    at = T0 + timedelta(minutes=5) + after

    fx = step(records, message("p2", at))

    assert list(records.conversations) == [conv_id]
    conv = records.conversations[conv_id]
    assert records.customer is not None
    assert records.customer.open_conversation_id == conv_id
    assert (conv.status, conv.resolved_at, conv.agent_id, conv.team_id, conv.pool) == (
        ConversationStatus.WAITING_ON_AGENT,
        None,
        None,
        None,
        None,
    )
    assert of(fx.events, ev.ConversationOpened) == []
    [changed] = of(fx.events, ev.ConversationStatusChanged)
    assert changed.status is ConversationStatus.WAITING_ON_AGENT
    [(key, route)] = routing_of(fx, RouteConversation)
    assert (key, route.conversation_id, route.known_agent_id) == ("pnw", conv_id, "sea-ana")
    assert [e.conversation_id for e in of(fx.events, ev.MessageAdded)] == [conv_id]


@pytest.mark.parametrize(
    ("setup", "after"),
    [
        (resolved, REOPEN_WINDOW + timedelta(seconds=1)),
        (resolved, timedelta(days=3)),
        # A conversation closed for inactivity is never reopened, however recent.
        (_closed_records, timedelta(minutes=1)),
    ],
)
def test_message_after_the_window_opens_a_new_conversation_linked_to_the_previous(setup, after):
    records, previous = setup()
    ended = records.conversations[previous]
    ended_at = ended.resolved_at or ended.closed_at
    assert ended_at is not None
    at = ended_at + after

    fx = step(records, message("p2", at))

    assert records.customer is not None
    new_id = records.customer.open_conversation_id
    assert new_id is not None and new_id != previous
    assert records.conversations[previous].is_open is False
    assert records.customer.last_conversation_id == new_id
    assert records.conversations[new_id].previous_conversation_id == previous
    [opened_event] = of(fx.events, ev.ConversationOpened)
    assert (opened_event.conversation_id, opened_event.previous_conversation_id) == (new_id, previous)
    [(_, route)] = routing_of(fx, RouteConversation)
    assert route.conversation_id == new_id


def test_close_inactive_closes_a_conversation_waiting_on_the_customer_and_frees_the_agent():
    records, conv_id = replied()
    at = records.conversations[conv_id].inactive_after
    assert at is not None
    fx = Effects("sweep-1")

    lifecycle.close_inactive(records, close_command(records, conv_id), fx)

    conv = records.conversations[conv_id]
    assert records.customer is not None
    assert (conv.status, conv.closed_at, records.customer.open_conversation_id) == (
        ConversationStatus.CLOSED_INACTIVE,
        at,
        None,
    )
    assert of(fx.events, ev.ConversationClosed) == [
        ev.ConversationClosed(
            conversation_id=conv_id,
            customer_id=CUSTOMER,
            team_id="pnw",
            agent_id="sea-ana",
            status=ConversationStatus.CLOSED_INACTIVE,
            closed_at=at,
            home_team_id="pnw",
        )
    ]
    [(key, release)] = fx.routing
    assert (key, type(release), release.conversation_id) == ("pnw", ReleaseConversation, conv_id)


@pytest.mark.parametrize("setup", [_closed_records, resolved])
def test_close_inactive_leaves_an_ended_conversation_alone(setup):
    records, conv_id = setup()
    status = records.conversations[conv_id].status
    fx = Effects("sweep-2")

    lifecycle.close_inactive(records, close_command(records, conv_id, T0 + timedelta(days=1)), fx)

    assert (fx.events, fx.routing) == ([], [])
    assert records.conversations[conv_id].status is status


def test_a_stale_deadline_or_a_conversation_waiting_on_the_agent_is_not_closed():
    records, conv_id = replied()
    stale = records.conversations[conv_id].inactive_after - timedelta(seconds=1)
    fx = Effects("sweep-3")
    lifecycle.close_inactive(records, close_command(records, conv_id, stale), fx)
    assert (fx.events, records.conversations[conv_id].status) == ([], ConversationStatus.WAITING_ON_CUSTOMER)

    records, conv_id = assigned()  # waiting on the agent: inactivity does not apply
    lifecycle.close_inactive(records, close_command(records, conv_id, T0 + timedelta(days=3)), fx)
    assert (fx.events, records.conversations[conv_id].status) == ([], ConversationStatus.WAITING_ON_AGENT)


# --- transfers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("team", "pool", "agent", "to"),
    [
        ("pnw", PoolKind.HOME_TEAM, "sea-ana", "sea-ben"),
        # The pool decides whether the target is a teammate; we forward it there unchanged.
        ("pnw", PoolKind.HOME_TEAM, "sea-ana", "nyc-hana"),
        (STANDARD_POOL_ID, PoolKind.STANDARD, "std-avery", "std-blake"),
    ],
)
def test_transfer_is_forwarded_to_the_pool_that_holds_the_conversation(team, pool, agent, to):
    records, conv_id = opened()
    step(records, decision(conv_id, T0 + timedelta(seconds=1), agent, team_id=team, pool=pool))
    at = T0 + timedelta(minutes=4)

    fx = step(records, transfer_to(conv_id, at, agent_id=agent, to=to))

    [(key, move)] = fx.routing
    assert key == team
    assert isinstance(move, MoveToTeammate)
    assert (move.conversation_id, move.customer_id, move.from_agent_id, move.to_agent_id, move.requested_at) == (
        conv_id,
        CUSTOMER,
        agent,
        to,
        at,
    )
    assert fx.events == []
    assert records.conversations[conv_id].agent_id == agent  # unchanged until the pool decides


# --- customer commands -----------------------------------------------------------------------


def _opt_out(at: datetime, customer_id: str = CUSTOMER) -> OptOutOfHomeTeam:
    return OptOutOfHomeTeam(command_id="cmd-out", customer_id=customer_id, requested_at=at)


def _opt_in(at: datetime, customer_id: str = CUSTOMER) -> OptInToHomeTeam:
    return OptInToHomeTeam(command_id="cmd-in", customer_id=customer_id, requested_at=at)


def _reassign(team: str):
    def build(at: datetime, customer_id: str = CUSTOMER) -> ReassignHomeTeam:
        return ReassignHomeTeam(command_id="cmd-move", customer_id=customer_id, team_id=team, reason="moved", requested_at=at)

    return build


@pytest.mark.parametrize(
    ("commands", "opted_out", "home_team", "source"),
    [
        ([_opt_out], True, "pnw", "area_code"),
        ([_opt_out, _opt_in], False, "pnw", "area_code"),
        ([_opt_in], False, "pnw", "area_code"),
        ([_reassign("northeast")], False, "northeast", "reassigned"),
        ([_opt_out, _reassign("midwest")], True, "midwest", "reassigned"),
    ],
)
def test_customer_commands_change_preferences_and_announce_them(commands, opted_out, home_team, source):
    records, _ = opened()
    last: Effects | None = None
    for i, build in enumerate(commands):
        last = step(records, build(T0 + timedelta(minutes=i + 1)))

    assert records.customer is not None
    assert (records.customer.opted_out, records.customer.home_team_id, records.customer.home_team_source) == (
        opted_out,
        home_team,
        source,
    )
    assert last is not None
    assert last.events == [
        ev.CustomerPreferencesChanged(
            customer_id=CUSTOMER,
            home_team_id=home_team,
            opted_out=opted_out,
            authenticated=False,
            at=T0 + timedelta(minutes=len(commands)),
        )
    ]


@pytest.mark.parametrize(
    ("opt_out", "reassign_to", "route_key", "route_opted_out"),
    [
        (True, None, "pnw", True),
        (False, "northeast", "northeast", False),
        (True, "northeast", "northeast", True),
    ],
)
def test_routing_of_the_next_conversation_honours_the_preferences(opt_out, reassign_to, route_key, route_opted_out):
    records, conv_id = resolved()
    if opt_out:
        step(records, _opt_out(T0 + timedelta(minutes=6)))
    if reassign_to:
        step(records, _reassign(reassign_to)(T0 + timedelta(minutes=7)))

    fx = step(records, message("p2", T0 + timedelta(days=2)))

    [(key, route)] = routing_of(fx, RouteConversation)
    assert (key, route.home_team_id, route.opted_out) == (route_key, route_key, route_opted_out)
    [opened_event] = of(fx.events, ev.ConversationOpened)
    assert opened_event.home_team_id == route_key


@pytest.mark.parametrize(
    ("known_customer", "build", "reason"),
    [
        (True, _reassign("atlantis"), "unknown_team"),
        (True, _reassign(STANDARD_POOL_ID), "unknown_team"),  # the standard pool is not a home team
        (False, _reassign("northeast"), "unknown_customer"),
        (False, _opt_out, "unknown_customer"),
        (False, _opt_in, "unknown_customer"),
    ],
)
def test_customer_command_that_cannot_be_carried_out_is_rejected(known_customer, build, reason):
    records = opened()[0] if known_customer else CustomerRecords(customer=None)
    cmd = build(T0 + timedelta(minutes=1))

    fx = step(records, cmd)

    assert fx.events == [
        ev.CommandRejected(
            command_id=cmd.command_id,
            command_type=type(cmd).__name__,
            customer_id=CUSTOMER,
            reason=reason,
            at=T0 + timedelta(minutes=1),
        )
    ]
    if known_customer:
        assert records.customer is not None
        assert (records.customer.home_team_id, records.customer.opted_out) == ("pnw", False)
    else:
        assert records.customer is None


# --- authentication --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "authenticated", "preference_events"),
    [
        ([(Channel.APP, True)], True, [0]),
        ([(Channel.SMS, False), (Channel.APP, True)], True, [1]),
        ([(Channel.APP, True), (Channel.APP, True), (Channel.SMS, False)], True, [0]),
        ([(Channel.SMS, False), (Channel.BUSINESS_CHAT, False)], False, []),
    ],
)
def test_authenticated_app_message_marks_the_customer_authenticated_once(messages, authenticated, preference_events):
    records = CustomerRecords(customer=None)
    announced = []
    for i, (channel, auth) in enumerate(messages):
        fx = step(records, message(f"p{i}", T0 + timedelta(minutes=i), channel, authenticated=auth))
        changes = of(fx.events, ev.CustomerPreferencesChanged)
        assert all(c.authenticated for c in changes)
        announced += [i] * len(changes)

    assert records.customer is not None
    assert records.customer.authenticated is authenticated
    assert announced == preference_events


def test_authentication_carries_over_to_the_next_conversation():
    records = CustomerRecords(customer=None)
    step(records, message("p1", T0, Channel.APP, authenticated=True))
    assert records.customer is not None
    first = records.customer.open_conversation_id
    assert first is not None
    step(records, decision(first, T0 + timedelta(seconds=1), "sea-ana"))
    step(records, resolution(first, T0 + timedelta(minutes=3)))

    fx = step(records, message("p2", T0 + timedelta(days=1), Channel.SMS))

    assert records.customer.authenticated is True
    assert records.customer.open_conversation_id not in (None, first)
    assert of(fx.events, ev.CustomerPreferencesChanged) == []


# --- determinism -----------------------------------------------------------------------------


def _scenario(first_message_id: str = "p1") -> list[Effects]:
    """A whole conversation, from a fresh customer, returning every step's effects."""
    records = CustomerRecords(customer=None)
    out = [step(records, message(first_message_id, T0, Channel.SMS))]
    assert records.customer is not None
    conv_id = records.customer.open_conversation_id
    assert conv_id is not None
    out.append(step(records, decision(conv_id, T0 + timedelta(seconds=1), "sea-ana")))
    out.append(step(records, reply(conv_id, T0 + timedelta(minutes=1))))
    out.append(step(records, message("p2", T0 + timedelta(minutes=2), Channel.APP)))
    out.append(step(records, transfer_to(conv_id, T0 + timedelta(minutes=3))))
    out.append(step(records, resolution(conv_id, T0 + timedelta(minutes=4))))
    out.append(step(records, message("p3", T0 + timedelta(minutes=5), Channel.SMS)))
    return out


def _dump(effects: list[Effects]) -> list[dict[str, Any]]:
    return [
        {
            "events": [(type(e).__name__, e.model_dump()) for e in fx.events],
            "routing": [(key, type(c).__name__, c.model_dump()) for key, c in fx.routing],
            "deliveries": [d.model_dump() for d in fx.deliveries],
            "lines": list(fx.lines),
        }
        for fx in effects
    ]


def test_same_inputs_give_identical_effects_ids_included():
    first, second = _dump(_scenario()), _dump(_scenario())

    assert first == second
    ids = [
        cmd["request_id"] for step_fx in first for _, _, cmd in step_fx["routing"]
    ] + [d["delivery_id"] for step_fx in first for d in step_fx["deliveries"]]
    assert len(ids) == len(set(ids)), "every derived id is distinct"


def test_different_input_ids_give_different_derived_ids():
    first, other = _scenario("p1"), _scenario("p1-other")

    conv_first = of(first[0].events, ev.ConversationOpened)[0].conversation_id
    conv_other = of(other[0].events, ev.ConversationOpened)[0].conversation_id
    assert conv_first != conv_other
    assert first[0].routing[0][1].request_id != other[0].routing[0][1].request_id
