"""Which applied inputs a customer remembers, to drop a repeat: the latest 64 whatever their
age, older ones for 15 minutes, never more than 512."""

from __future__ import annotations

import pytest

from services.conversation_state.lifecycle import MAX_RECENT_INPUT_IDS, RECENT_INPUTS_ALWAYS, recent_inputs

MIN = 60.0
T = 1_800_000_000.0


def history(n: int, every_s: float, end: float = T) -> tuple[list[str], list[float]]:
    """n inputs, one every ``every_s`` seconds, the last at ``end``."""
    return [f"in-{i}" for i in range(n)], [end - (n - 1 - i) * every_s for i in range(n)]


@pytest.mark.parametrize(
    ("n", "every_s", "kept"),
    [
        (0, 1.0, 1),  # the first input
        (10, 1.0, 11),
        (200, 60.0, RECENT_INPUTS_ALWAYS),  # a slow customer: the latest 64 (about an hour here)
        (200, 1.0, 201),  # a busy one: everything of the last 15 minutes
        (1000, 1.0, 901),  # 15 minutes of one a second (900) and the new one
        (1000, 0.1, MAX_RECENT_INPUT_IDS),  # never more than 512
    ],
)
def test_how_many_inputs_are_remembered(n: int, every_s: float, kept: int) -> None:
    ids, times = history(n, every_s)
    kept_ids, kept_times = recent_inputs(ids, times, "new", T + every_s)
    assert len(kept_ids) == len(kept_times) == min(kept, MAX_RECENT_INPUT_IDS)
    assert kept_ids[-1] == "new" and kept_times[-1] == T + every_s
    assert kept_ids[:-1] == ids[len(ids) - len(kept_ids) + 1 :]  # the latest, in order


def test_ids_remembered_before_times_were_kept_count_as_now() -> None:
    ids = [f"old-{i}" for i in range(300)]
    kept, times = recent_inputs(ids, [], "new", T)
    assert kept == [*ids, "new"] and times == [T] * 301
    # 16 minutes later only the latest 64 are left of them.
    later, _ = recent_inputs(kept, times, "newer", T + 16 * MIN)
    assert later == [*kept[-(RECENT_INPUTS_ALWAYS - 1) :], "newer"]
