"""``conversations.events.v1``: the conversation lifecycle, for integrators and other services.

Keyed by customer id. Events carry no message text; the read API serves transcripts.
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


class ConversationOpened(InboundModel):
    conversation_id: Identifier
    customer_id: Identifier
    home_team_id: Identifier
    channel: Channel
    opened_at: AwareDatetime
    previous_conversation_id: Identifier | None = None


class MessageAdded(InboundModel):
    """A line in the transcript (text omitted); the metrics service counts turns from these."""

    conversation_id: Identifier
    customer_id: Identifier
    message_id: Identifier
    direction: Direction
    channel: Channel
    agent_id: Identifier | None = None
    team_id: Identifier | None = None
    at: AwareDatetime


class ConversationAssigned(InboundModel):
    conversation_id: Identifier
    customer_id: Identifier
    pool: PoolKind
    team_id: Identifier
    agent_id: Identifier
    reason: RoutingReason
    pool_reason: RoutingReason
    at: AwareDatetime


class ConversationQueued(InboundModel):
    conversation_id: Identifier
    customer_id: Identifier
    pool: PoolKind
    team_id: Identifier
    pool_reason: RoutingReason
    queue_position: int | None = None
    at: AwareDatetime


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


class ConversationClosed(InboundModel):
    """Closed for inactivity (the customer went quiet past their adaptive timeout)."""

    conversation_id: Identifier
    customer_id: Identifier
    team_id: Identifier | None = None
    agent_id: Identifier | None = None
    status: ConversationStatus = Field(default=ConversationStatus.CLOSED_INACTIVE)
    closed_at: AwareDatetime


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
