"""``conversations.events.v1``: the conversation lifecycle, for integrators and other services.

Keyed by customer id. Events carry no message text; the read API serves transcripts.

Each event also carries what the messaging KPIs need to know about it (a turn starting, a
first response, a first placement, a repeat contact, the lines a team takes over), worked
out by conversation-state, which holds each customer's history: the metrics service only
adds them up and keeps nothing per customer.
"""

from __future__ import annotations

from pydantic import AwareDatetime, Field

from shared.contracts.common import (
    Channel,
    ConversationStatus,
    Direction,
    Identifier,
    PoolKind,
    RoutingReason,
)
from shared.contracts.envelope import InboundModel


class RepeatContact(InboundModel):
    """The customer's previous conversation, resolved less than 7 days before this one opened."""

    conversation_id: Identifier
    resolved_at: AwareDatetime
    team_id: Identifier = Field(description="The team it was resolved by (its home team if it had none)")
    agent_id: Identifier | None = None


class LinesBeforePlacement(InboundModel):
    """Lines a conversation got while no team held it (before routing placed it, or after it
    reopened), grouped by hour, direction and channel: counted for the team that takes it."""

    at: AwareDatetime = Field(description="The first of these lines")
    direction: Direction
    channel: Channel
    lines: int = Field(ge=1)
    turns: int = Field(ge=0, description="How many of these lines started a turn")


class ConversationOpened(InboundModel):
    conversation_id: Identifier
    customer_id: Identifier
    home_team_id: Identifier
    channel: Channel
    opened_at: AwareDatetime
    previous_conversation_id: Identifier | None = None
    repeat_of: RepeatContact | None = Field(
        default=None, description="Set when this is a repeat contact: the resolved conversation it follows within 7 days"
    )


class MessageAdded(InboundModel):
    """A line in the transcript (text omitted). A line added while no team holds the
    conversation (``team_id`` null) is counted with the placement or ending that follows
    (``lines_before_placement``)."""

    conversation_id: Identifier
    customer_id: Identifier
    message_id: Identifier
    direction: Direction
    channel: Channel
    agent_id: Identifier | None = None
    team_id: Identifier | None = None
    at: AwareDatetime
    starts_turn: bool = Field(
        default=False, description="The first line of a turn: the other side wrote last, or it is the conversation's first line"
    )
    first_response_seconds: float | None = Field(
        default=None, ge=0, description="On the conversation's first agent line: seconds since the customer's first message (or its opening)"
    )


class ConversationAssigned(InboundModel):
    conversation_id: Identifier
    customer_id: Identifier
    pool: PoolKind
    team_id: Identifier
    agent_id: Identifier
    reason: RoutingReason
    pool_reason: RoutingReason
    at: AwareDatetime
    home_team_id: Identifier | None = None
    previous_agent_id: Identifier | None = Field(default=None, description="Who held it before (a move between teammates)")
    first_placement: bool = Field(default=False, description="The conversation's first placement in any pool")
    lines_before_placement: list[LinesBeforePlacement] = Field(default_factory=list)


class ConversationQueued(InboundModel):
    conversation_id: Identifier
    customer_id: Identifier
    pool: PoolKind
    team_id: Identifier
    pool_reason: RoutingReason
    queue_position: int | None = None
    at: AwareDatetime
    home_team_id: Identifier | None = None
    first_placement: bool = Field(default=False, description="The conversation's first placement in any pool")
    lines_before_placement: list[LinesBeforePlacement] = Field(default_factory=list)


class ConversationStatusChanged(InboundModel):
    conversation_id: Identifier
    customer_id: Identifier
    status: ConversationStatus
    at: AwareDatetime
    inactive_after: AwareDatetime | None = Field(
        default=None,
        description="Waiting on the customer: closed as inactive if they stay silent until then "
        "(adaptive to how this customer replies)",
    )


class ConversationTransferRefused(InboundModel):
    conversation_id: Identifier
    customer_id: Identifier
    from_agent_id: Identifier
    to_agent_id: Identifier
    reason: Identifier
    at: AwareDatetime


class ConversationResolved(InboundModel):
    conversation_id: Identifier
    customer_id: Identifier
    team_id: Identifier | None = None
    agent_id: Identifier | None = None
    resolved_at: AwareDatetime
    home_team_id: Identifier | None = None
    opened_at: AwareDatetime | None = None
    lines_before_placement: list[LinesBeforePlacement] = Field(default_factory=list)


class ConversationClosed(InboundModel):
    """Closed for inactivity (the customer went quiet past their adaptive timeout)."""

    conversation_id: Identifier
    customer_id: Identifier
    team_id: Identifier | None = None
    agent_id: Identifier | None = None
    status: ConversationStatus = Field(default=ConversationStatus.CLOSED_INACTIVE)
    closed_at: AwareDatetime
    home_team_id: Identifier | None = None
    lines_before_placement: list[LinesBeforePlacement] = Field(default_factory=list)


class CustomerPreferencesChanged(InboundModel):
    customer_id: Identifier
    home_team_id: Identifier
    opted_out: bool
    authenticated: bool
    at: AwareDatetime


class CommandRejected(InboundModel):
    """An agent action or customer command that could not be carried out, and why."""

    command_id: Identifier
    command_type: Identifier
    customer_id: Identifier
    conversation_id: Identifier | None = None
    agent_id: Identifier | None = None
    reason: Identifier = Field(
        description="unknown_conversation, conversation_not_open, not_assignee, unknown_team, "
        "unknown_customer"
    )
    at: AwareDatetime


class CallbackScheduled(InboundModel):
    callback_id: Identifier
    customer_id: Identifier
    due_at: AwareDatetime
    at: AwareDatetime
