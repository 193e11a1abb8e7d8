"""Building an envelope does not parametrize ``Envelope[T]`` per record: pydantic holds its
parametrized generics only weakly and rebuilt the model class again and again in
conversation-state (10% of its CPU)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from shared.contracts.envelope import Envelope, envelope_type, new_envelope

NOW = datetime(2026, 11, 23, 9, tzinfo=UTC)


class Ping(BaseModel):
    n: int


def test_the_envelope_model_of_a_payload_type_is_built_once(monkeypatch) -> None:
    calls: list[Any] = []
    original = Envelope.__class_getitem__.__func__  # type: ignore[attr-defined]

    def counting(cls: type, params: Any) -> Any:
        calls.append(params)
        return original(cls, params)

    monkeypatch.setattr(Envelope, "__class_getitem__", classmethod(counting))
    envelopes = [new_envelope(Ping(n=i), subject="s", source="/t", time=NOW) for i in range(50)]
    assert len(calls) <= 1  # once for Ping (none if an earlier test built it)
    assert {type(e) for e in envelopes} == {envelope_type(Ping)}
    assert envelopes[7].data == Ping(n=7) and envelopes[7].type == "hometeam.Ping"
