"""A batch's deadline changes collapse to one net change per kind and entity."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.timeout_sweeper.deadlines import RESPONSE, Arm, Cancel, Change, collapse

T = datetime(2026, 11, 23, 9, tzinfo=UTC)


def arm(version: str, *, if_absent: bool = False) -> Arm:
    return Arm(RESPONSE, "conv-1", T + timedelta(minutes=int(version)), version, {}, only_if_absent=if_absent)


CANCEL = Cancel(RESPONSE, "conv-1")


@pytest.mark.parametrize(
    ("changes", "net"),
    [
        ([arm("1")], arm("1")),
        ([arm("1"), arm("2")], arm("2")),  # the last wins
        ([arm("1"), CANCEL], CANCEL),
        ([CANCEL, arm("2")], arm("2")),
        # a follow-up's clock does not restart one armed earlier in the batch ...
        ([arm("1"), arm("2", if_absent=True)], arm("1")),
        # ... nor, left conditional, one armed in an earlier batch (the store decides) ...
        ([arm("2", if_absent=True)], arm("2", if_absent=True)),
        # ... but after a cancel in the batch (the agent replied) nothing runs: it arms.
        ([CANCEL, arm("2", if_absent=True)], arm("2")),
        ([arm("1"), CANCEL, arm("3", if_absent=True)], arm("3")),
        ([CANCEL, arm("2", if_absent=True), arm("3", if_absent=True)], arm("2")),
    ],
)
def test_collapse(changes: list[Change], net: Change) -> None:
    assert collapse(changes) == {(RESPONSE, "conv-1"): net}
