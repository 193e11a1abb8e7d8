"""``envelope_json`` writes what ``new_envelope(...).model_dump_json()`` writes, byte for byte,
for every message type, and refuses the envelopes ``Envelope`` refuses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.contracts.envelope import RawEnvelope, envelope_json, envelope_type, new_envelope, type_name
from shared.contracts.registry import MESSAGE_TYPES

EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "contracts" / "examples" / "v1"
NOW = datetime(2026, 11, 23, 9, 4, 5, 120_000, tzinfo=UTC)


def payloads() -> list[object]:
    out = []
    for path in sorted(EXAMPLES.glob("*.json")):
        raw = RawEnvelope.model_validate_json(path.read_bytes())
        out.append(MESSAGE_TYPES[raw.type].model_validate(raw.data))
    return out


@pytest.mark.parametrize("payload", payloads(), ids=lambda p: type(p).__name__)
@pytest.mark.parametrize(
    "fields",
    [
        {"subject": "cus_1", "source": "/hometeam/conversation-state", "time": NOW, "id": "e-1"},
        {"subject": "cus_ü \"quoted\"", "source": "/x", "time": NOW.astimezone(timezone(timedelta(hours=-5))), "id": "é", "sequence": 7},
        {"subject": "s" * 256, "source": "s" * 256, "time": NOW, "id": "i" * 128, "schemaversion": 3, "sequence": 1},
    ],
    ids=["plain", "escapes-and-offset", "longest"],
)
def test_same_bytes_as_the_envelope_model(payload, fields) -> None:
    expected = new_envelope(payload, **fields).model_dump_json().encode()  # type: ignore[arg-type]
    assert envelope_json(payload, **fields) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [
        {"id": ""},
        {"id": "i" * 129},
        {"subject": ""},
        {"subject": "s" * 257},
        {"source": ""},
        {"time": NOW.replace(tzinfo=None)},
        {"sequence": 0},
        {"schemaversion": 0},
    ],
    ids=lambda b: next(iter(b)) + ("-empty" if next(iter(b.values())) == "" else ""),
)
def test_refuses_what_the_envelope_model_refuses(bad) -> None:
    payload = payloads()[0]
    fields = {"subject": "cus_1", "source": "/t", "time": NOW, "id": "e-1", **bad}
    with pytest.raises(ValidationError):  # (the model itself: ``new_envelope`` puts a uuid for an empty id)
        envelope_type(type(payload))(type=type_name(type(payload)), data=payload, **fields)
    with pytest.raises(ValueError):
        envelope_json(payload, **fields)  # type: ignore[arg-type]
