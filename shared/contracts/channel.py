"""``channel.inbound.v1``: customer messages as channel adapters (and ingest's webhooks) post them."""

from __future__ import annotations

from typing import Annotated

from pydantic import AwareDatetime, Field, HttpUrl, StringConstraints, model_validator

from shared.contracts.common import Address, Channel, Identifier, MessageText
from shared.contracts.envelope import InboundModel

Zip = Annotated[str, StringConstraints(pattern=r"^[0-9]{5}(-[0-9]{4})?$")]
Market = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]


class Attachment(InboundModel):
    content_type: Annotated[str, StringConstraints(max_length=100, pattern=r"^[\w.+-]+/[\w.+-]+$")]
    url: HttpUrl | None = None
    name: Annotated[str, StringConstraints(max_length=200)] | None = None
    size_bytes: Annotated[int, Field(ge=0)] | None = None


class RegionHints(InboundModel):
    """What the channel knows about where the customer lives; used only on first contact."""

    zip: Zip | None = None
    market: Market | None = None


class ChannelMessagePosted(InboundModel):
    """A customer wrote to us on some channel.

    ``address`` is the customer's address on that channel: an E.164 phone number for SMS, the
    opaque source id for business chat, the app account id for the app (where the app backend
    has authenticated the customer and ``authenticated`` is true). The key of the record must
    not be personal data: use ``address_key(channel, address)``.
    """

    channel: Channel
    provider_message_id: Identifier
    address: Address
    text: MessageText = ""
    attachments: Annotated[list[Attachment], Field(max_length=10)] = []
    sent_at: AwareDatetime
    business_id: Identifier | None = None
    authenticated: bool = False
    linked_phone: Address | None = Field(
        default=None, description="App only: the account's phone, linking the SMS identity."
    )
    region: RegionHints = RegionHints()

    @model_validator(mode="after")
    def _authenticated_only_in_app(self) -> ChannelMessagePosted:
        if self.authenticated and self.channel is not Channel.APP:
            raise ValueError("only the app channel can carry an authenticated identity")
        if self.linked_phone is not None and not self.authenticated:
            raise ValueError("linked_phone needs an authenticated app identity")
        if not self.text and not self.attachments:
            raise ValueError("a message needs text or at least one attachment")
        return self

