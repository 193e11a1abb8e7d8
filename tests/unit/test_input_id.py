"""``lifecycle.input_id`` of every payload conversation-state reads: the first of its message,
action, command and decision ids that is set, named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.contracts.envelope import RawEnvelope
from shared.contracts.registry import MESSAGE_TYPES

from services.conversation_state import lifecycle
from services.conversation_state.app import INPUTS

EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "contracts" / "examples" / "v1"


def example(model: type) -> Any:
    raw = RawEnvelope.model_validate_json((EXAMPLES / f"{model.__name__}.json").read_bytes())
    return MESSAGE_TYPES[raw.type].model_validate(raw.data)


@pytest.mark.parametrize("model", [p for t in INPUTS for p in t.payloads], ids=lambda m: m.__name__)
def test_input_id_names_the_first_id_set(model: type) -> None:
    payload = example(model)
    present = [(n, getattr(payload, n)) for n in lifecycle.INPUT_ID_FIELDS if getattr(payload, n, None) is not None]
    assert present, f"{model.__name__} carries no input id"
    name, value = present[0]
    assert lifecycle.input_id(payload) == f"{name}:{value}"
    assert lifecycle.input_id(payload) == f"{name}:{value}"  # (the second time from what the first remembered)


def test_a_payload_without_an_input_id_is_refused() -> None:
    from pydantic import BaseModel

    class NoId(BaseModel):
        message_id: str | None = None

    with pytest.raises(TypeError):
        lifecycle.input_id(NoId())
