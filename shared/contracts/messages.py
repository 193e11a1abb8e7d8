"""``messages.received.v1`` (internal) and ``messages.outbound.v1`` (for channel adapters)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AwareDatetime, Field

from shared.contracts.channel import Attachment, RegionHints
from shared.contracts.common import Address, Channel, Identifier, MessageText
from shared.contracts.envelope import InboundModel


class CustomerMessageReceived(InboundModel):
    """A channel message, deduplicated by id and resolved to a customer (keyed by customer)."""

    message_id: Identifier = Field(description="Derived from channel and provider message id")
    customer_id: Identifier
    channel: Channel
    address: Address
    provider_message_id: Identifier
    text: MessageText = ""
    attachments: Annotated[list[Attachment], Field(max_length=10)] = []
    sent_at: AwareDatetime
    received_at: AwareDatetime
    business_id: Identifier | None = None
    authenticated: bool = False
    region: RegionHints = RegionHints()
    new_customer: bool = Field(
        default=False,
        description=(
            "Ingest created this customer for this very message (the first of theirs it saw); later messages of the "
            "same customer carry false. A consumer may take it as 'nothing is stored for them' only for a record it "
            "did not possibly handle before: one that replays several topics after a crash may already hold state "
            "for this customer from its other inputs (conversation-state trusts it only at or past the end the "
            "partition had when it took the partition)."
        ),
    )


class DeliverMessage(InboundModel):
    """Command to the channel adapter: deliver this agent reply to the customer."""

    delivery_id: Identifier
    customer_id: Identifier
    conversation_id: Identifier
    channel: Channel = Field(description="The channel the customer last used")
    address: Address
    business_id: Identifier | None = None
    text: MessageText
    agent_id: Identifier
    requested_at: AwareDatetime
