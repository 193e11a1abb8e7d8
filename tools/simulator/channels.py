"""How a simulated customer's message reaches hometeam: as a ``ChannelMessagePosted`` envelope
on ``channel.inbound.v1`` (what a channel adapter publishes), or as the request a provider
posts to ingest's webhooks, signed the way ingest checks it (Twilio's HMAC-SHA1 signature for
SMS, HS256 bearer JWTs for business chat and the app)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlencode

import jwt

from services.ingest.normalize import address_key
from services.ingest.webhooks import twilio_signature
from shared.contracts.channel import ChannelMessagePosted
from shared.contracts.common import Channel
from shared.contracts.envelope import new_envelope
from tools.simulator.script import BUSINESS_CHAT_ID, BUSINESS_NUMBER, Persona

SOURCE = "/tools/simulator"

# The local-only defaults scripts/run.sh gives the services; the environment wins, as there.
LOCAL_DEFAULTS = {
    "TWILIO_AUTH_TOKEN": "local-twilio-auth-token",
    "BUSINESS_CHAT_JWT_SECRET": "local-business-chat-secret-0123456789",
    "BUSINESS_CHAT_JWT_AUDIENCE": "hometeam-business-chat",
    "APP_JWT_SECRET": "local-app-secret-0123456789abcdef",
    "APP_JWT_AUDIENCE": "hometeam-app",
    "PUBLIC_BASE_URL": "http://127.0.0.1:8081",
}


@dataclass(frozen=True)
class Secrets:
    twilio_auth_token: str
    business_chat_secret: str
    business_chat_audience: str
    app_secret: str
    app_audience: str
    public_base_url: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Secrets:
        env = os.environ if env is None else env

        def get(name: str) -> str:
            return env.get(name) or LOCAL_DEFAULTS[name]

        return cls(
            twilio_auth_token=get("TWILIO_AUTH_TOKEN"),
            business_chat_secret=get("BUSINESS_CHAT_JWT_SECRET"),
            business_chat_audience=get("BUSINESS_CHAT_JWT_AUDIENCE"),
            app_secret=get("APP_JWT_SECRET"),
            app_audience=get("APP_JWT_AUDIENCE"),
            public_base_url=get("PUBLIC_BASE_URL"),
        )

    def __repr__(self) -> str:  # never print the secrets
        return f"Secrets(public_base_url={self.public_base_url!r}, ...)"


@dataclass(frozen=True)
class WebhookRequest:
    """One POST to ingest: path, headers and body, ready to send."""

    path: str
    headers: dict[str, str]
    content: bytes


def channel_message(persona: Persona, text: str, provider_message_id: str, now: datetime, *, by_phone: bool = False) -> ChannelMessagePosted:
    """The channel message as an adapter would post it. ``by_phone``: an app customer texting
    from the account's phone instead (SMS; the same customer, linked by ingest)."""
    if by_phone and persona.linked_phone:
        data = {"channel": Channel.SMS, "address": persona.linked_phone, "business_id": _digits(BUSINESS_NUMBER)}
    elif persona.channel is Channel.SMS:
        data = {"channel": Channel.SMS, "address": persona.address, "business_id": _digits(BUSINESS_NUMBER)}
    elif persona.channel is Channel.BUSINESS_CHAT:
        data = {
            "channel": Channel.BUSINESS_CHAT,
            "address": persona.address,
            "business_id": BUSINESS_CHAT_ID,
            "region": {"market": persona.market} if persona.market else {},
        }
    else:
        region = {k: v for k, v in (("zip", persona.zip), ("market", persona.market)) if v}
        data = {
            "channel": Channel.APP,
            "address": persona.address,
            "authenticated": True,
            "linked_phone": persona.linked_phone,
            "region": region,
        }
    return ChannelMessagePosted.model_validate({**data, "provider_message_id": provider_message_id, "text": text, "sent_at": now})


def _digits(number: str) -> str:
    # As ingest's SMS webhook keeps the number texted: "tel-<digits>".
    return "tel-" + "".join(ch for ch in number if ch.isdigit())


def inbound_record(message: ChannelMessagePosted, now: datetime) -> tuple[bytes, bytes]:
    """(key, value) for ``channel.inbound.v1``: the key is the address key, never the address."""
    key = address_key(message.channel, message.address)
    envelope = new_envelope(message, subject=key, source=SOURCE, time=now, id=str(uuid.uuid4()))
    return key.encode(), envelope.model_dump_json().encode()


def _bearer(secret: str, audience: str, now: datetime, subject: str | None = None) -> str:
    claims: dict[str, object] = {"aud": audience, "iat": int(now.timestamp()), "exp": int((now + timedelta(minutes=5)).timestamp())}
    if subject:
        claims["sub"] = subject
    return jwt.encode(claims, secret, algorithm="HS256")


def webhook_request(
    persona: Persona, text: str, provider_message_id: str, now: datetime, secrets: Secrets, *, by_phone: bool = False
) -> WebhookRequest:
    """The provider's signed request for this message (see ingest's ``webhooks.py``)."""
    if (by_phone and persona.linked_phone) or persona.channel is Channel.SMS:
        params = {
            "From": persona.linked_phone if by_phone and persona.linked_phone else persona.address,
            "To": BUSINESS_NUMBER,
            "Body": text,
            "MessageSid": provider_message_id,
            "NumMedia": "0",
        }
        url = secrets.public_base_url.rstrip("/") + "/webhooks/sms"
        return WebhookRequest(
            "/webhooks/sms",
            {
                "content-type": "application/x-www-form-urlencoded",
                "x-twilio-signature": twilio_signature(secrets.twilio_auth_token, url, params),
            },
            urlencode(params).encode(),
        )
    if persona.channel is Channel.BUSINESS_CHAT:
        body: dict[str, object] = {
            "message_id": provider_message_id,
            "source_id": persona.address,
            "business_id": BUSINESS_CHAT_ID,
            "text": text,
        }
        if persona.market:
            body["market"] = persona.market
        token = _bearer(secrets.business_chat_secret, secrets.business_chat_audience, now)
        return WebhookRequest(
            "/webhooks/business-chat",
            {"content-type": "application/json", "authorization": f"Bearer {token}"},
            json.dumps(body).encode(),
        )
    body = {"message_id": provider_message_id, "text": text}
    for name, value in (("phone", persona.linked_phone), ("zip", persona.zip), ("market", persona.market)):
        if value:
            body[name] = value
    token = _bearer(secrets.app_secret, secrets.app_audience, now, subject=persona.address)
    return WebhookRequest(
        "/webhooks/app",
        {"content-type": "application/json", "authorization": f"Bearer {token}"},
        json.dumps(body).encode(),
    )
