"""Derived ids are uuid5 of the joined parts in the project's namespace: the same input gives
the same ids in every version, so receivers drop a repeat by id across upgrades too."""

from __future__ import annotations

import random
import string
import uuid

import pytest

from shared.contracts.envelope import ID_NAMESPACE, derived_id

RNG = random.Random(20261204)
RANDOM_PARTS = [
    tuple("".join(RNG.choice(string.printable + "éü✓🙂") for _ in range(RNG.randrange(0, 80))) for _ in range(RNG.randrange(1, 5)))
    for _ in range(200)
]


@pytest.mark.parametrize(
    "parts",
    [("",), ("a",), ("msg-sms-SM1", "event0"), ("conversation", "callback", "cb-1"), ("x" * 10_000,), *RANDOM_PARTS],
)
def test_a_derived_id_is_the_uuid5_of_its_parts(parts: tuple[str, ...]) -> None:
    assert derived_id(*parts) == str(uuid.uuid5(ID_NAMESPACE, "\x1f".join(parts)))


def test_a_derived_id_is_a_version_5_uuid() -> None:
    parsed = uuid.UUID(derived_id("input", "event", "0"))
    assert (parsed.version, parsed.variant) == (5, uuid.RFC_4122)
