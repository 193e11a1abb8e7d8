"""HTTP webhooks: SMS (Twilio-style form posts), business chat and in-app (JSON with bearer
JWTs). Each one authenticates, validates and normalizes into ``ChannelMessagePosted`` and
publishes it to ``channel.inbound.v1``; it answers only once Kafka has the record.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import jwt
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shared.contracts.channel import Attachment, ChannelMessagePosted
from shared.contracts.common import Address, Channel, Identifier, MessageText
from shared.runtime.http import problem

Publish = Callable[[ChannelMessagePosted], Awaitable[None]]
_US_ZIP = re.compile(r"^[0-9]{5}(-[0-9]{4})?$")
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
MAX_MEDIA = 10


def twilio_signature(auth_token: str, url: str, params: dict[str, str]) -> str:
    """Twilio's request signature: HMAC-SHA1 (auth token) over the full URL followed by each
    POST parameter's name and value, sorted by name; base64."""
    payload = url + "".join(f"{k}{params[k]}" for k in sorted(params))
    digest = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def valid_twilio_signature(auth_token: str, url: str, params: dict[str, str], given: str | None) -> bool:
    if not given:
        return False
    return hmac.compare_digest(twilio_signature(auth_token, url, params).encode(), given.encode())


def sms_from_form(params: dict[str, str], now: datetime) -> ChannelMessagePosted:
    """A Twilio-style inbound SMS/MMS form as a channel message (raises ValidationError)."""
    try:
        media_count = int(params.get("NumMedia", "0") or 0)
    except ValueError:
        media_count = -1
    if not 0 <= media_count <= MAX_MEDIA:
        raise ValueError(f"NumMedia must be an integer between 0 and {MAX_MEDIA}")
    attachments = [
        {"url": params.get(f"MediaUrl{i}"), "content_type": params.get(f"MediaContentType{i}", "application/octet-stream")}
        for i in range(media_count)
    ]
    # FromZip is only a hint (and only a US ZIP is one): anything else is ignored rather than
    # rejecting the customer's message over it.
    from_zip = params.get("FromZip", "")
    region = {"zip": from_zip} if _US_ZIP.match(from_zip) else {}
    return ChannelMessagePosted.model_validate(
        {
            "channel": Channel.SMS,
            "provider_message_id": params.get("MessageSid"),
            "address": params.get("From"),
            "text": params.get("Body", ""),
            "attachments": attachments,
            "sent_at": now,
            "business_id": _business_number(params.get("To")),
            "region": region,
        }
    )


def _business_number(to: str | None) -> str | None:
    # The number the customer texted; kept as the business id (digits only) so a reply can go
    # out from the same number.
    if not to:
        return None
    digits = "".join(ch for ch in to if ch.isdigit())
    return f"tel-{digits}" if digits else None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


class BusinessChatMessage(_Body):
    """An iMessage-style business chat message, as the chat provider posts it."""

    message_id: Identifier
    source_id: Address = Field(description="Opaque customer id from the chat provider")
    business_id: Identifier
    text: MessageText = ""
    attachments: Annotated[list[Attachment], Field(max_length=MAX_MEDIA)] = []
    sent_at: AwareDatetime | None = None
    market: str | None = None


class AppMessage(_Body):
    """A message from the app backend for its signed-in customer (the token's ``sub``)."""

    message_id: Identifier
    text: MessageText = ""
    attachments: Annotated[list[Attachment], Field(max_length=MAX_MEDIA)] = []
    sent_at: AwareDatetime | None = None
    phone: Address | None = Field(default=None, description="The account's phone, to link SMS")
    zip: str | None = None
    market: str | None = None


def _validation_problem(exc: ValidationError) -> Response:
    errors = [
        {"loc": ".".join(str(p) for p in e["loc"]), "type": e["type"], "msg": e["msg"]}
        for e in exc.errors(include_input=False, include_url=False, include_context=False)
    ]
    return problem(422, "invalid message", details=errors)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _verify_jwt(token: str, secret: str, audience: str) -> dict[str, Any]:
    return jwt.decode(
        token,
        secret,
        algorithms=["HS256"],
        audience=audience,
        options={"require": ["exp", "aud"]},
        leeway=30,
    )


async def _read_body(request: Request, max_bytes: int) -> bytes | Response:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        return problem(413, f"request body larger than {max_bytes} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            return problem(413, f"request body larger than {max_bytes} bytes")
    return body


async def _json_object(request: Request, max_bytes: int) -> dict[str, Any] | Response:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return problem(415, "content-type must be application/json")
    body = await _read_body(request, max_bytes)
    if isinstance(body, Response):
        return body
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return problem(400, "body is not valid JSON")
    if not isinstance(data, dict):
        return problem(400, "body must be a JSON object")
    return data


def webhook_routes(
    publish: Publish,
    *,
    twilio_auth_token: str | None,
    public_base_url: str | None,
    business_chat_secret: str | None,
    business_chat_audience: str,
    app_secret: str | None,
    app_audience: str,
    max_request_bytes: int,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> list[Route]:
    async def sms(request: Request) -> Response:
        if not twilio_auth_token:
            return problem(503, "the SMS webhook is not configured (TWILIO_AUTH_TOKEN)")
        body = await _read_body(request, max_request_bytes)
        if isinstance(body, Response):
            return body
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            return problem(415, "content-type must be application/x-www-form-urlencoded")
        form: FormData = await _parse_form(request, body)
        params = {k: str(v) for k, v in form.multi_items()}
        url = str(request.url) if not public_base_url else public_base_url.rstrip("/") + request.url.path + (
            f"?{request.url.query}" if request.url.query else ""
        )
        if not valid_twilio_signature(twilio_auth_token, url, params, request.headers.get("x-twilio-signature")):
            return problem(403, "missing or invalid X-Twilio-Signature")
        try:
            message = sms_from_form(params, clock())
        except ValidationError as exc:
            return _validation_problem(exc)
        except ValueError as exc:
            return problem(422, str(exc))
        await publish(message)
        return Response(EMPTY_TWIML, media_type="text/xml")

    async def business_chat(request: Request) -> Response:
        if not business_chat_secret:
            return problem(503, "the business chat webhook is not configured (BUSINESS_CHAT_JWT_SECRET)")
        token = _bearer(request)
        if token is None:
            return problem(401, "missing bearer token", )
        try:
            _verify_jwt(token, business_chat_secret, business_chat_audience)
        except jwt.PyJWTError as exc:
            return problem(403, f"invalid token: {type(exc).__name__}")
        data = await _json_object(request, max_request_bytes)
        if isinstance(data, Response):
            return data
        try:
            chat = BusinessChatMessage.model_validate(data)
            message = ChannelMessagePosted.model_validate(
                {
                    "channel": Channel.BUSINESS_CHAT,
                    "provider_message_id": chat.message_id,
                    "address": chat.source_id,
                    "text": chat.text,
                    "attachments": chat.attachments,
                    "sent_at": chat.sent_at or clock(),
                    "business_id": chat.business_id,
                    "region": {"market": chat.market} if chat.market else {},
                }
            )
        except ValidationError as exc:
            return _validation_problem(exc)
        await publish(message)
        return JSONResponse({"status": "accepted", "message_id": chat.message_id}, status_code=202)

    async def app(request: Request) -> Response:
        if not app_secret:
            return problem(503, "the app webhook is not configured (APP_JWT_SECRET)")
        token = _bearer(request)
        if token is None:
            return problem(401, "missing bearer token")
        try:
            claims = _verify_jwt(token, app_secret, app_audience)
        except jwt.PyJWTError as exc:
            return problem(403, f"invalid token: {type(exc).__name__}")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            return problem(403, "token has no customer subject (sub)")
        data = await _json_object(request, max_request_bytes)
        if isinstance(data, Response):
            return data
        try:
            body = AppMessage.model_validate(data)
            region = {k: v for k, v in (("zip", body.zip), ("market", body.market)) if v}
            message = ChannelMessagePosted.model_validate(
                {
                    "channel": Channel.APP,
                    "provider_message_id": body.message_id,
                    "address": subject,
                    "text": body.text,
                    "attachments": body.attachments,
                    "sent_at": body.sent_at or clock(),
                    "authenticated": True,
                    "linked_phone": body.phone,
                    "region": region,
                }
            )
        except ValidationError as exc:
            return _validation_problem(exc)
        await publish(message)
        return JSONResponse({"status": "accepted", "message_id": body.message_id}, status_code=202)

    return [
        Route("/webhooks/sms", sms, methods=["POST"]),
        Route("/webhooks/business-chat", business_chat, methods=["POST"]),
        Route("/webhooks/app", app, methods=["POST"]),
    ]


async def _parse_form(request: Request, body: bytes) -> FormData:
    from urllib.parse import parse_qsl

    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        pairs = []
    return FormData(pairs)
