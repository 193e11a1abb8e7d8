"""Personal data never reaches a log line: phone numbers and message text are masked, while
the ids, instants and offsets that make a log useful are left alone."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from shared.runtime.logging import JsonFormatter, mask_personal_data

PHONE = "+12065550100"


@pytest.mark.parametrize(
    ("line", "gone", "kept"),
    [
        # Phone numbers, E.164 and national formats, wherever they appear.
        (PHONE, [PHONE, "2065550100"], []),
        ("sms from +442071838750 queued", ["442071838750"], ["sms from", "queued"]),
        ("call (206) 555-0100 back", ["206", "555-0100"], ["call", "back"]),
        ("call 206-555-0100", ["206-555-0100", "555-0100"], ["call"]),
        ("call 206.555.0100", ["206.555.0100"], ["call"]),
        ("call +1 206 555 0100", ["206 555 0100"], ["call"]),
        ("call +1 (206) 555-0100", ["206", "555-0100"], ["call"]),
        ("call 2065550100", ["2065550100"], ["call"]),
        ("identity sms:+12065550100 created", ["2065550100"], ["identity sms:", "created"]),
        ("reply to tel:+12065550100", ["2065550100"], ["reply to tel:"]),
        # URL-encoded E.164, as in a raw form post, under any key.
        ("Caller=%2B12065550100&CallStatus=ringing", ["2065550100"], ["Caller=", "&CallStatus=ringing"]),
        ("redirect?to=%2b442071838750", ["442071838750"], ["redirect?to="]),
        # A phone right after a date is still a phone.
        ("2026-03-14 2065550100 wrote", ["2065550100"], ["2026-03-14 ", " wrote"]),
        ("2026-03-14 10:00:00 call 206 555 0100", ["206 555 0100"], ["2026-03-14 10:00:00 call "]),
        # Values of fields that carry text or addresses.
        ("text=hello", ["hello"], ["text="]),
        ("text='I need help with my bill'", ["need help", "bill"], ["text="]),
        ('{"text": "I need help with my bill", "channel": "sms"}', ["need help"], ['"channel": "sms"']),
        ('{"text": "say \\"hi\\" to my bill", "n": 1}', ["hi", "my bill"], ['"n": 1']),
        ("{'body': 'where is my order'}", ["where is my order"], ["'body'"]),
        (
            "Body=Need+help+with+my+bill&From=%2B12065550100&To=%2B18005550199&NumMedia=0",
            ["Need+help", "2065550100", "8005550199"],
            ["NumMedia=0"],
        ),
        (
            "CustomerMessageReceived(message_id='msg-1', address='+12065550100', text='I lost my phone', channel='sms')",
            ["2065550100", "lost my phone"],
            ["message_id='msg-1'", "channel='sms'"],
        ),
        ('{"linked_phone": "+12065550100", "sub": "acct-42"}', ["2065550100"], ['"sub": "acct-42"']),
    ],
)
def test_personal_data_is_masked(line, gone, kept):
    masked = mask_personal_data(line)

    for secret in gone:
        assert secret not in masked
    for part in kept:
        assert part in masked


@pytest.mark.parametrize(
    "line",
    [
        "conversation 6b0e2a51-3c7d-5e8f-9a1b-2c3d4e5f6a7b opened",
        "request 12345678-90ab-4cde-8f01-234567890abc routed",
        "customer cus_3f2a9c4be1d04c61a8f0d2b7e6a1c9d0",
        "message SM0123456789abcdef0123456789abcdef",
        "decided at 2026-03-14T10:00:00+00:00",
        "decided at 2026-03-14T10:00:00.123456Z",
        "decided at 2026-11-23T17:04:05.195-05:00",
        "due at 2026-03-14 10:00:00+00:00",  # str(datetime)
        "2026-03-14 10:00:00,123 started",  # logging's asctime
        "holiday 2026-11-26 closes the team",
        "topic=messages.received.v1 partition=11 offset=4821733",
        "partition 3 offset 42",
        "committed offsets 1200-1450 on partitions [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]",
        "pnw-seattle queue depth 20, oldest wait 615.5 s",
        "faststream 0.7.8, opentelemetry 1.38.0",
    ],
)
def test_ids_instants_and_offsets_are_not_masked(line):
    assert mask_personal_data(line) == line


def _format(formatter: JsonFormatter, record: logging.LogRecord) -> tuple[str, dict]:
    out = formatter.format(record)
    return out, json.loads(out)


def _record(msg: str, *args: object, exc_info=None, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("hometeam.test", logging.WARNING, __file__, 1, msg, args, exc_info)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


@pytest.mark.parametrize("field", ["text", "body", "message_text", "address", "phone", "linked_phone", "payload"])
def test_json_formatter_masks_sensitive_extra_fields(field):
    value = f"I need help, call me at {PHONE}"

    out, entry = _format(JsonFormatter("ingest"), _record("message received", **{field: value}))

    assert entry[field] == "***"
    assert "I need help" not in out and "2065550100" not in out
    assert (entry["service"], entry["logger"], entry["level"], entry["msg"]) == (
        "ingest",
        "hometeam.test",
        "warning",
        "message received",
    )


def test_json_formatter_keeps_plain_extra_fields_and_masks_phones_inside_them():
    out, entry = _format(
        JsonFormatter("conversation-state"),
        _record(
            "dead-lettering record",
            topic="messages.received.v1",
            partition=7,
            offset=12345678901,
            error_type="ValidationError",
            detail=f"bad address {PHONE}",
            context={"customer": "cus_1", "text": "hello there"},
        ),
    )

    assert (entry["topic"], entry["partition"], entry["offset"], entry["error_type"]) == (
        "messages.received.v1",
        7,
        12345678901,
        "ValidationError",
    )
    assert "2065550100" not in out
    assert entry["detail"].startswith("bad address ")
    assert "cus_1" in entry["context"] and "hello there" not in out


def test_json_formatter_masks_phones_in_the_message_arguments():
    out, entry = _format(JsonFormatter("ingest"), _record("no customer for %s on %s", PHONE, "sms"))

    assert "2065550100" not in out
    assert entry["msg"].endswith(" on sms")


def test_json_formatter_masks_phones_and_text_inside_exceptions():
    try:
        raise ValueError(f"cannot deliver text='I lost my phone' to {PHONE}")
    except ValueError:
        exc_info = sys.exc_info()

    out, entry = _format(JsonFormatter("ingest"), _record("delivery failed", exc_info=exc_info))

    assert "Traceback" in entry["exc"] and "ValueError: cannot deliver" in entry["exc"]
    assert "2065550100" not in out
    assert "I lost my phone" not in out
