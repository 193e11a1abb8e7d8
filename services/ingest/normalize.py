"""Turning a channel message into the normalized ``CustomerMessageReceived``."""

from __future__ import annotations

import hashlib
from datetime import datetime

from shared.contracts.channel import ChannelMessagePosted
from shared.contracts.common import Channel
from shared.contracts.envelope import derived_id
from shared.contracts.messages import CustomerMessageReceived


def message_id(channel: Channel, provider_message_id: str, business_id: str | None = None) -> str:
    """The same provider message always gets the same id, so a retry is recognised downstream."""
    return derived_id("message", channel.value, business_id or "", provider_message_id)


def address_key(channel: Channel | str, address: str) -> str:
    """The record key for ``channel.inbound.v1``: stable per address, but not the address
    itself (keys can show up in tooling and traces)."""
    return hashlib.sha256(f"{Channel(channel).value}:{address}".encode()).hexdigest()[:32]


def normalize(msg: ChannelMessagePosted, customer_id: str, received_at: datetime, *, new_customer: bool = False) -> CustomerMessageReceived:
    return CustomerMessageReceived(
        message_id=message_id(msg.channel, msg.provider_message_id, msg.business_id),
        customer_id=customer_id,
        channel=msg.channel,
        address=msg.address,
        provider_message_id=msg.provider_message_id,
        text=msg.text,
        attachments=msg.attachments,
        sent_at=msg.sent_at,
        received_at=received_at,
        business_id=msg.business_id,
        authenticated=msg.authenticated,
        region=msg.region,
        new_customer=new_customer,
    )
