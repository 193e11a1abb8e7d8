"""The ingest webhooks, wired into a Starlette app and called over ASGI (no Kafka): what they
accept, what they publish, and the clear 4xx answer to everything else.

Twilio signatures are produced by Twilio's own ``RequestValidator``; JWTs by PyJWT. PyJWT
checks ``exp`` against the wall clock, so tokens expire relative to ``time.time()``; every
other instant comes from the explicit ``NOW`` given to the routes as their clock.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from twilio.request_validator import RequestValidator

from services.ingest.webhooks import EMPTY_TWIML, twilio_signature, valid_twilio_signature, webhook_routes
from shared.contracts.channel import ChannelMessagePosted
from shared.contracts.common import Channel

NOW = datetime(2026, 3, 2, 17, 0, tzinfo=UTC)
BASE = "http://hometeam.test"
SMS_URL = f"{BASE}/webhooks/sms"
TWILIO_TOKEN = "twilio-auth-token-0f1e2d3c4b5a6978"
CHAT_SECRET = "business-chat-secret-for-tests-0123456789"
CHAT_AUDIENCE = "hometeam-business-chat"
APP_SECRET = "app-secret-for-tests-0123456789abcdefgh"
APP_AUDIENCE = "hometeam-app"
MAX_BYTES = 2048
CONFIG: dict[str, Any] = {
    "twilio_auth_token": TWILIO_TOKEN,
    "public_base_url": None,
    "business_chat_secret": CHAT_SECRET,
    "business_chat_audience": CHAT_AUDIENCE,
    "app_secret": APP_SECRET,
    "app_audience": APP_AUDIENCE,
    "max_request_bytes": MAX_BYTES,
}
# Personal data sent in requests; no error answer may repeat it.
PHONE = "+12065550123"
SECRET_TEXT = "my account pin is 4471 please help"


class Recorder:
    """A fake ``publish``: records every message it is given."""

    def __init__(self) -> None:
        self.published: list[ChannelMessagePosted] = []

    async def __call__(self, message: ChannelMessagePosted) -> None:
        self.published.append(message)


async def call(path: str, config: dict[str, Any] | None = None, **request: Any) -> tuple[httpx.Response, Recorder]:
    recorder = Recorder()
    routes = webhook_routes(recorder, **{**CONFIG, **(config or {})}, clock=lambda: NOW)
    transport = httpx.ASGITransport(app=Starlette(routes=routes))
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        response = await client.post(path, **request)
    return response, recorder


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """A 4xx/5xx answer: JSON with a reason, and no personal data from the request."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"]
    for secret in (PHONE, PHONE.lstrip("+"), PHONE[-7:], SECRET_TEXT, "4471"):
        assert secret not in response.text
    return body


# --- SMS -------------------------------------------------------------------------------------

SMS_FORM = {
    "MessageSid": "SM0123456789abcdef0123456789abcdef",
    "AccountSid": "AC0123456789abcdef0123456789abcdef",
    "From": PHONE,
    "To": "+18005550199",
    "Body": SECRET_TEXT,
    "FromZip": "98101",
    "FromCity": "SEATTLE",
    "NumMedia": "0",
}


def signed(params: dict[str, str], url: str = SMS_URL, token: str = TWILIO_TOKEN) -> dict[str, str]:
    return {"X-Twilio-Signature": RequestValidator(token).compute_signature(url, params)}


@pytest.mark.parametrize(
    ("extra", "text", "attachments"),
    [
        ({}, SECRET_TEXT, []),
        ({"Body": "¿Dónde está mi pedido? 📦 a&b=c+d %20"}, "¿Dónde está mi pedido? 📦 a&b=c+d %20", []),
        (
            {
                "Body": "",
                "NumMedia": "2",
                "MediaUrl0": "https://api.twilio.com/media/ME1",
                "MediaContentType0": "image/jpeg",
                "MediaUrl1": "https://api.twilio.com/media/ME2",
                "MediaContentType1": "video/mp4",
            },
            "",
            [("https://api.twilio.com/media/ME1", "image/jpeg"), ("https://api.twilio.com/media/ME2", "video/mp4")],
        ),
        (
            {"NumMedia": "1", "MediaUrl0": "https://api.twilio.com/media/ME3"},
            SECRET_TEXT,
            [("https://api.twilio.com/media/ME3", "application/octet-stream")],
        ),
    ],
)
async def test_sms_signed_by_twilio_is_answered_with_empty_twiml_and_published(extra, text, attachments):
    form = {**SMS_FORM, **extra}

    response, recorder = await call("/webhooks/sms", data=form, headers=signed(form))

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/xml")
    assert response.text == EMPTY_TWIML == '<?xml version="1.0" encoding="UTF-8"?><Response/>'
    [message] = recorder.published
    assert (message.channel, message.address, message.provider_message_id, message.text) == (
        Channel.SMS,
        PHONE,
        SMS_FORM["MessageSid"],
        text,
    )
    assert (message.region.zip, message.sent_at, message.business_id, message.authenticated) == (
        "98101",
        NOW,
        "tel-18005550199",
        False,
    )
    assert [(str(a.url), a.content_type) for a in message.attachments] == attachments


async def test_sms_without_from_zip_has_no_region():
    form = {k: v for k, v in SMS_FORM.items() if k != "FromZip"}

    response, recorder = await call("/webhooks/sms", data=form, headers=signed(form))

    assert response.status_code == 200
    assert recorder.published[0].region.zip is None


@pytest.mark.parametrize(
    ("url", "params"),
    [
        (SMS_URL, {}),
        (SMS_URL, SMS_FORM),
        (SMS_URL, {"Body": "héllo wörld ✓", "From": "+4930123456"}),
        (SMS_URL, {"b": "1", "B": "2", "a": "", "A_": "x", "_z": "y"}),  # code-point order
        (f"{SMS_URL}?tenant=acme&x=1", {"Body": "query strings are part of the URL"}),
        ("https://hooks.example.com:8443/webhooks/sms", {"To": "+18005550199", "Body": "a=b&c=d"}),
    ],
)
def test_our_signature_equals_twilios(url, params):
    expected = RequestValidator(TWILIO_TOKEN).compute_signature(url, params)

    assert twilio_signature(TWILIO_TOKEN, url, params) == expected
    assert valid_twilio_signature(TWILIO_TOKEN, url, params, expected)
    assert not valid_twilio_signature("another-token", url, params, expected)


def _tampered(form: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    return {**form, "Body": "transfer my number"}, signed(form)


def _added_param(form: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    return {**form, "ToZip": "10001"}, signed(form)


def _other_from(form: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    return {**form, "From": "+12065550999"}, signed(form)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda form: (form, {}), id="missing"),
        pytest.param(lambda form: (form, {"X-Twilio-Signature": ""}), id="empty"),
        pytest.param(lambda form: (form, {"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"}), id="garbage"),
        pytest.param(lambda form: (form, signed(form, token="someone-elses-token")), id="other token"),
        pytest.param(lambda form: (form, signed(form, url="https://hometeam.test/webhooks/sms")), id="other url"),
        pytest.param(_tampered, id="tampered body"),
        pytest.param(_other_from, id="tampered sender"),
        pytest.param(_added_param, id="added param"),
    ],
)
async def test_sms_without_a_valid_signature_is_forbidden(make):
    form, headers = make(SMS_FORM)

    response, recorder = await call("/webhooks/sms", data=form, headers=headers)

    body = assert_problem(response, 403)
    assert "signature" in body["error"].lower()
    assert recorder.published == []


@pytest.mark.parametrize(
    ("public_base_url", "signed_url", "path", "status"),
    [
        ("https://hooks.example.com", "https://hooks.example.com/webhooks/sms", "/webhooks/sms", 200),
        ("https://hooks.example.com/", "https://hooks.example.com/webhooks/sms", "/webhooks/sms", 200),
        ("https://hooks.example.com", "https://hooks.example.com/webhooks/sms?t=1", "/webhooks/sms?t=1", 200),
        # Behind the proxy, the URL the service itself sees is not what the provider signed.
        ("https://hooks.example.com", SMS_URL, "/webhooks/sms", 403),
        ("https://hooks.example.com", "https://hooks.example.com/webhooks/sms", "/webhooks/sms?t=1", 403),
        (None, "https://hooks.example.com/webhooks/sms", "/webhooks/sms", 403),
    ],
)
async def test_sms_signature_is_checked_against_the_public_base_url(public_base_url, signed_url, path, status):
    response, recorder = await call(
        path, {"public_base_url": public_base_url}, data=SMS_FORM, headers=signed(SMS_FORM, url=signed_url)
    )

    assert response.status_code == status
    assert len(recorder.published) == (1 if status == 200 else 0)


async def _chunks(total: int):
    sent = 0
    while sent < total:
        yield b"Body=" + b"x" * 500 + b"&"
        sent += 506


@pytest.mark.parametrize(
    "request_kwargs",
    [
        pytest.param({"data": {**SMS_FORM, "Body": "x" * (MAX_BYTES + 1)}}, id="declared length"),
        pytest.param(
            {"content": _chunks(MAX_BYTES * 2), "headers": {"content-type": "application/x-www-form-urlencoded"}},
            id="streamed without length",
        ),
    ],
)
async def test_sms_body_over_the_limit_is_refused(request_kwargs):
    response, recorder = await call("/webhooks/sms", **request_kwargs)

    assert_problem(response, 413)
    assert recorder.published == []


@pytest.mark.parametrize(
    "content_type", ["application/json", "text/plain", "multipart/form-data; boundary=x", None]
)
async def test_sms_with_the_wrong_content_type_is_unsupported(content_type):
    body = json.dumps(SMS_FORM).encode()
    headers = {**signed(SMS_FORM)}
    if content_type:
        headers["content-type"] = content_type

    response, recorder = await call("/webhooks/sms", content=body, headers=headers)

    assert_problem(response, 415)
    assert recorder.published == []


@pytest.mark.parametrize("token", [None, ""])
async def test_sms_webhook_without_a_token_is_not_configured(token):
    response, recorder = await call(
        "/webhooks/sms", {"twilio_auth_token": token}, data=SMS_FORM, headers=signed(SMS_FORM)
    )

    assert_problem(response, 503)
    assert recorder.published == []


@pytest.mark.parametrize(
    "change",
    [
        {"NumMedia": "eleven"},
        {"NumMedia": "11"},
        {"NumMedia": "-1"},
        {"NumMedia": "1", "MediaUrl0": "javascript:alert(1)"},
        {"From": "+1 206 555 0123"},
        {"From": "$where"},
        {"MessageSid": "$ne"},
        {"MessageSid": ""},
        {"Body": "", "NumMedia": "0"},
    ],
)
async def test_signed_but_invalid_sms_is_unprocessable(change):
    form = {k: v for k, v in {**SMS_FORM, **change}.items() if v != "" or k == "Body"}

    response, recorder = await call("/webhooks/sms", data=form, headers=signed(form))

    assert_problem(response, 422)
    assert recorder.published == []


# --- business chat ---------------------------------------------------------------------------


def token(secret: str = CHAT_SECRET, *, algorithm: str = "HS256", expires_in: int | None = 3600, **claims: Any) -> str:
    payload: dict[str, Any] = {"aud": CHAT_AUDIENCE, "iss": "chat-provider", **claims}
    if expires_in is not None:
        payload["exp"] = int(time.time()) + expires_in
    return jwt.encode(payload, secret, algorithm=algorithm)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


CHAT_BODY = {
    "message_id": "chat-msg-001",
    "source_id": "urn:mbid:AQAAY1x7Xg",
    "business_id": "biz-acme",
    "text": SECRET_TEXT,
    "market": "seattle",
}


@pytest.mark.parametrize(
    ("extra", "sent_at"),
    [
        ({}, NOW),
        ({"sent_at": "2026-03-02T16:59:58Z"}, datetime(2026, 3, 2, 16, 59, 58, tzinfo=UTC)),
        # Unknown fields are ignored (providers add fields over time).
        ({"locale": "en_US", "intent": {"$gt": ""}, "capabilities": ["list"]}, NOW),
    ],
)
async def test_business_chat_with_a_valid_token_is_accepted_and_published(extra, sent_at):
    response, recorder = await call("/webhooks/business-chat", json={**CHAT_BODY, **extra}, headers=bearer(token()))

    assert response.status_code == 202
    assert response.json() == {"status": "accepted", "message_id": "chat-msg-001"}
    [message] = recorder.published
    assert (message.channel, message.address, message.business_id, message.provider_message_id) == (
        Channel.BUSINESS_CHAT,
        CHAT_BODY["source_id"],
        "biz-acme",
        "chat-msg-001",
    )
    assert (message.text, message.region.market, message.sent_at, message.authenticated) == (
        SECRET_TEXT,
        "seattle",
        sent_at,
        False,
    )
    assert "locale" not in message.model_dump()


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no header"),
        pytest.param({"Authorization": ""}, id="empty"),
        pytest.param({"Authorization": "Bearer "}, id="bearer without token"),
        pytest.param({"Authorization": "Basic dXNlcjpwYXNz"}, id="basic"),
    ],
)
async def test_business_chat_without_a_bearer_token_is_unauthorized(headers):
    response, recorder = await call("/webhooks/business-chat", json=CHAT_BODY, headers=headers)

    assert_problem(response, 401)
    assert recorder.published == []


def _alg_none() -> str:
    return jwt.encode({"aud": CHAT_AUDIENCE, "exp": int(time.time()) + 3600}, None, algorithm="none")


def _alg_none_signed_with_secret_header() -> str:
    # "none" in the header, the secret's HS256 signature attached: still not acceptable.
    good = token()
    _, payload, signature = good.split(".")
    header = jwt.utils.base64url_encode(json.dumps({"alg": "none", "typ": "JWT"}).encode()).decode()
    return f"{header}.{payload}.{signature}"


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(lambda: token("a-different-secret-0123456789abcdefgh"), id="wrong secret"),
        pytest.param(lambda: token(aud="hometeam-app"), id="wrong audience"),
        pytest.param(lambda: token(aud=None), id="no audience"),
        pytest.param(lambda: token(expires_in=-3600), id="expired"),
        pytest.param(lambda: token(expires_in=None), id="no expiry"),
        pytest.param(_alg_none, id="alg none"),
        pytest.param(_alg_none_signed_with_secret_header, id="alg none with signature"),
        pytest.param(
            lambda: token(algorithm="HS512"),
            id="other algorithm",
            marks=pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning"),
        ),
        pytest.param(lambda: "not.a.jwt", id="garbage"),
    ],
)
async def test_business_chat_with_an_invalid_token_is_forbidden(make_token):
    response, recorder = await call("/webhooks/business-chat", json=CHAT_BODY, headers=bearer(make_token()))

    body = assert_problem(response, 403)
    assert "token" in body["error"]
    assert recorder.published == []


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        pytest.param(b'{"message_id": "m1", "text": "' + SECRET_TEXT.encode() + b'"', "application/json", 400, id="truncated"),
        pytest.param(b"\xff\xfe" + PHONE.encode(), "application/json", 400, id="not utf-8"),
        pytest.param(b"", "application/json", 400, id="empty"),
        pytest.param(json.dumps([CHAT_BODY]).encode(), "application/json", 400, id="array"),
        pytest.param(json.dumps(PHONE).encode(), "application/json", 400, id="string"),
        pytest.param(b"null", "application/json", 400, id="null"),
        pytest.param(json.dumps(CHAT_BODY).encode(), "text/plain", 415, id="wrong content type"),
        pytest.param(json.dumps(CHAT_BODY).encode(), "application/x-www-form-urlencoded", 415, id="form"),
        pytest.param(
            json.dumps({**CHAT_BODY, "text": SECRET_TEXT * 100}).encode(), "application/json", 413, id="too large"
        ),
    ],
)
async def test_business_chat_body_that_is_not_a_json_object_is_refused(content, content_type, status):
    response, recorder = await call(
        "/webhooks/business-chat", content=content, headers={**bearer(token()), "content-type": content_type}
    )

    assert_problem(response, status)
    assert recorder.published == []


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"text": {"$gt": ""}}, id="operator as text"),
        pytest.param({"source_id": {"$ne": None}}, id="operator as source id"),
        pytest.param({"message_id": {"$ne": None}}, id="operator as message id"),
        pytest.param({"business_id": ["biz-acme"]}, id="list as business id"),
        pytest.param({"source_id": "$where"}, id="operator-like source id"),
        pytest.param({"message_id": "$gt"}, id="operator-like message id"),
        pytest.param({"source_id": PHONE + " x"}, id="whitespace in source id"),
        pytest.param({"message_id": None}, id="null message id"),
        pytest.param({"text": 12345}, id="number as text"),
        pytest.param({"text": "", "attachments": []}, id="nothing to say"),
        pytest.param({"text": "x" * 4097}, id="text too long"),
        pytest.param({"market": "Seattle Downtown"}, id="bad market"),
        pytest.param({"attachments": [{"content_type": "image/png", "url": "ftp:/x"}]}, id="bad attachment"),
        pytest.param({"sent_at": "2026-03-02T16:59:58"}, id="naive sent_at"),
    ],
)
async def test_business_chat_with_a_wrong_field_is_unprocessable(change):
    body = {**CHAT_BODY, **change}

    response, recorder = await call(
        "/webhooks/business-chat", config={"max_request_bytes": 16_384}, json=body, headers=bearer(token())
    )

    problem = assert_problem(response, 422)
    assert problem["details"] and all(set(d) == {"loc", "type", "msg"} for d in problem["details"])
    assert recorder.published == []


async def test_business_chat_without_a_secret_is_not_configured():
    response, recorder = await call(
        "/webhooks/business-chat", {"business_chat_secret": None}, json=CHAT_BODY, headers=bearer(token())
    )

    assert_problem(response, 503)
    assert recorder.published == []


# --- app -------------------------------------------------------------------------------------


def app_token(secret: str = APP_SECRET, **claims: Any) -> str:
    return token(secret, **{"aud": APP_AUDIENCE, **claims})


APP_BODY = {"message_id": "app-msg-001", "text": SECRET_TEXT}


@pytest.mark.parametrize(
    ("extra", "linked_phone", "zip_code", "market"),
    [
        ({}, None, None, None),
        ({"phone": PHONE}, PHONE, None, None),
        ({"phone": PHONE, "zip": "98101", "market": "seattle"}, PHONE, "98101", "seattle"),
        ({"authenticated": False, "address": "acct-someone-else"}, None, None, None),  # not the body's to say
    ],
)
async def test_app_message_is_from_the_token_subject_and_authenticated(extra, linked_phone, zip_code, market):
    response, recorder = await call(
        "/webhooks/app", json={**APP_BODY, **extra}, headers=bearer(app_token(sub="acct-42"))
    )

    assert response.status_code == 202
    [message] = recorder.published
    assert (message.channel, message.address, message.authenticated, message.linked_phone) == (
        Channel.APP,
        "acct-42",
        True,
        linked_phone,
    )
    assert (message.region.zip, message.region.market, message.sent_at, message.text) == (
        zip_code,
        market,
        NOW,
        SECRET_TEXT,
    )


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(lambda: app_token(), id="no sub"),
        pytest.param(lambda: app_token(sub=""), id="empty sub"),
        pytest.param(lambda: app_token(sub="acct-42", aud=CHAT_AUDIENCE), id="business chat audience"),
        pytest.param(lambda: token(CHAT_SECRET, sub="acct-42", aud=APP_AUDIENCE), id="business chat secret"),
        pytest.param(lambda: app_token(sub="acct-42", expires_in=-3600), id="expired"),
    ],
)
async def test_app_message_without_a_valid_subject_is_forbidden(make_token):
    response, recorder = await call("/webhooks/app", json={**APP_BODY, "phone": PHONE}, headers=bearer(make_token()))

    assert_problem(response, 403)
    assert recorder.published == []


@pytest.mark.parametrize(
    ("request_kwargs", "status"),
    [
        pytest.param({"json": {**APP_BODY, "phone": PHONE}}, 401, id="no token"),
        pytest.param({"json": {**APP_BODY, "phone": {"$ne": None}}}, 422, id="operator as phone"),
        pytest.param({"json": {**APP_BODY, "phone": "+1 206 555 0123"}}, 422, id="phone with spaces"),
        pytest.param({"json": {**APP_BODY, "phone": PHONE, "zip": "9810"}}, 422, id="bad zip"),
        pytest.param({"json": [APP_BODY]}, 400, id="array"),
        pytest.param({"content": b"{" + PHONE.encode(), "headers": {"content-type": "application/json"}}, 400, id="bad json"),
    ],
)
async def test_app_message_errors(request_kwargs, status):
    headers = {**request_kwargs.pop("headers", {})}
    if status != 401:
        headers.update(bearer(app_token(sub="acct-42")))

    response, recorder = await call("/webhooks/app", headers=headers, **request_kwargs)

    assert_problem(response, status)
    assert recorder.published == []
