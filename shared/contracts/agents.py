"""``agent.actions.v1`` and ``agent.presence.v1``: what agent desktops publish."""

from __future__ import annotations

from enum import StrEnum

from pydantic import AwareDatetime, Field

from shared.contracts.common import Identifier, MessageText, ReasonText
from shared.contracts.envelope import InboundModel


class ReplyToCustomer(InboundModel):
    """An agent answers; goes out on the channel the customer last used. Key: customer id."""

    action_id: Identifier
    customer_id: Identifier
    conversation_id: Identifier
    agent_id: Identifier
    text: MessageText = Field(min_length=1)
    sent_at: AwareDatetime


class ResolveConversation(InboundModel):
    """An agent marks the conversation resolved. Key: customer id."""

    action_id: Identifier
    customer_id: Identifier
    conversation_id: Identifier
    agent_id: Identifier
    resolved_at: AwareDatetime


class TransferConversation(InboundModel):
    """An agent hands the conversation to a teammate (never to another team). Key: customer id."""

    action_id: Identifier
    customer_id: Identifier
    conversation_id: Identifier
    agent_id: Identifier
    to_agent_id: Identifier
    note: ReasonText | None = None
    requested_at: AwareDatetime


class Presence(StrEnum):
    ONLINE = "online"
    AWAY = "away"
    OFFLINE = "offline"


class AgentPresenceChanged(InboundModel):
    """An agent signed in, stepped away or signed out. Key: agent id."""

    agent_id: Identifier
    presence: Presence
    changed_at: AwareDatetime
