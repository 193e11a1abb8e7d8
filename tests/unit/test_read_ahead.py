"""The sweep's read-ahead: which deadlines it hands out when, and when it must read the store again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.timeout_sweeper.sweep import ReadAhead, read_ahead_for

T = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
S = timedelta(seconds=1)


class Monotonic:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def docs(*pairs: tuple[str, int]) -> list[dict]:
    return [{"_id": i, "due_at": T + n * S} for i, n in pairs]


def make() -> tuple[ReadAhead, Monotonic]:
    mono = Monotonic()
    return ReadAhead(10 * S, mono), mono


def test_must_read_before_the_first_read_and_after_forget() -> None:
    ahead, _ = make()
    assert ahead.must_read(T)
    ahead.loaded(T, [], complete=True)
    assert not ahead.must_read(T + 9 * S)
    ahead.forget()
    assert ahead.must_read(T)


@pytest.mark.parametrize(
    ("clock_s", "real_s", "read"),
    [
        (0, 0, False),
        (9, 9, False),
        (10, 0, True),  # the window passed on the service clock
        (0, 10, True),  # a standing (test) clock: real time decides
    ],
)
def test_reads_again_when_the_window_passes(clock_s: int, real_s: int, read: bool) -> None:
    ahead, mono = make()
    ahead.loaded(T, [], complete=True)
    mono.t += real_s
    assert ahead.must_read(T + clock_s * S) is read


def test_hands_out_due_deadlines_earliest_first_up_to_the_limit() -> None:
    ahead, _ = make()
    ahead.loaded(T, docs(("b", 2), ("a", 2), ("c", 5), ("d", 9)), complete=True)
    assert ahead.take_due(T + S, 10) == []
    assert ahead.take_due(T + 5 * S, 2) == ["a", "b"]
    assert ahead.take_due(T + 5 * S, 2) == ["c"]
    assert ahead.take_due(T + 20 * S, 10) == ["d"]
    assert ahead.take_due(T + 20 * S, 10) == []


def test_armed_deadlines_join_only_inside_the_covered_window() -> None:
    ahead, _ = make()
    ahead.note([("early", T + S)])  # before any read: the first read finds it
    assert ahead.take_due(T + 20 * S, 10) == []
    ahead.loaded(T, [], complete=True)
    ahead.note([("soon", T + 3 * S), ("later", T + 11 * S)])  # later: beyond the window, read next time
    assert ahead.take_due(T + 20 * S, 10) == ["soon"]


def test_a_moved_deadline_is_handed_out_at_its_new_time_once() -> None:
    ahead, _ = make()
    ahead.loaded(T, docs(("x", 2)), complete=True)
    ahead.note([("x", T + 6 * S)])  # seen again with a later due time
    assert ahead.take_due(T + 3 * S, 10) == []
    ahead.note([("x", T + 6 * S)])  # noting the same time twice queues it once
    assert ahead.take_due(T + 6 * S, 10) == ["x"]
    assert ahead.take_due(T + 6 * S, 10) == []


def test_an_incomplete_read_covers_only_up_to_its_last_deadline() -> None:
    ahead, _ = make()
    ahead.loaded(T, docs(("a", 1), ("b", 4)), complete=False)  # the read hit its limit
    assert ahead.covered_until == T + 4 * S
    ahead.note([("c", T + 5 * S)])  # not covered: the next read brings it
    assert ahead.must_read(T + 4 * S)
    assert ahead.take_due(T + 9 * S, 10) == ["a", "b"]


def test_a_deadline_armed_while_a_read_is_in_flight_is_not_missed() -> None:
    ahead, _ = make()
    ahead.loaded(T, [], complete=True)  # covers up to T + 10 s
    ahead.begin_read()  # the next read, for the window up to T + 20 s, is in flight ...
    ahead.note([("armed", T + 13 * S)])  # ... when this process arms a deadline past the old window
    ahead.loaded(T + 10 * S, [], complete=True)  # the read did not see it
    assert ahead.take_due(T + 13 * S, 10) == ["armed"]


def test_a_failed_read_leaves_nothing_half_read() -> None:
    ahead, _ = make()
    ahead.begin_read()
    ahead.forget()  # the read raised
    ahead.note([("x", T + S)])
    assert ahead.must_read(T) and ahead.take_due(T + 5 * S, 10) == []


def test_has_due_counts_only_due_entries() -> None:
    ahead, _ = make()
    ahead.loaded(T, docs(("a", 1), ("b", 2), ("c", 8)), complete=True)
    assert ahead.has_due(T + 2 * S, 2) and not ahead.has_due(T + 2 * S, 3)


def test_an_armed_deadline_and_its_stored_copy_queue_once() -> None:
    """The store keeps milliseconds; the arming process knows microseconds."""
    ahead, _ = make()
    ahead.loaded(T, [], complete=True)
    ahead.note([("x", T + timedelta(seconds=2, microseconds=123_456))])
    ahead.note([("x", T + timedelta(seconds=2, microseconds=123_000))])
    assert len(ahead.heap) == 1 and ahead.take_due(T + 3 * S, 10) == ["x"]


@pytest.mark.parametrize(
    ("read_s", "window_s"),
    [
        (0.0, 10),  # an indexed store: the shortest window
        (0.1, 10),  # 0.1 s is 2% of 5 s: still the shortest
        (0.5, 25),  # 2% of 25 s
        (1.5, 75),  # FerretDB scanning ~50,000 deadlines
        (10.0, 120),  # never beyond the longest
    ],
)
def test_the_window_grows_with_what_a_read_takes(read_s: float, window_s: int) -> None:
    assert read_ahead_for(read_s, 10 * S, 120 * S) == window_s * S


def test_after_a_slow_read_the_next_one_looks_further_ahead_and_the_one_after_comes_later() -> None:
    mono = Monotonic()
    ahead = ReadAhead(10 * S, mono, longest=120 * S)
    ahead.loaded(T, [], complete=True, read_s=1.5)  # this read covered 10 s; the next looks 75 s ahead
    assert ahead.covered_until == T + 10 * S and ahead.window(T + 10 * S) == T + 85 * S
    mono.t += 9
    assert not ahead.must_read(T + 9 * S)
    assert ahead.must_read(T + 10 * S)
    ahead.loaded(T + 10 * S, [], complete=True, read_s=0.01)  # a quick read: back to the shortest next time
    assert ahead.covered_until == T + 85 * S and ahead.window(T + 85 * S) == T + 95 * S
    # A standing clock: the real time of the window actually read (75 s) decides, not the next one's.
    mono.t += 74
    assert not ahead.must_read(T + 10 * S)
    mono.t += 1
    assert ahead.must_read(T + 10 * S)


def test_the_longest_window_is_never_shorter_than_the_shortest() -> None:
    ahead = ReadAhead(30 * S, Monotonic(), longest=5 * S)
    ahead.loaded(T, [], complete=True, read_s=100.0)
    assert ahead.horizon == 30 * S


def test_a_requested_read_comes_at_the_next_sweep_and_once() -> None:
    ahead, _ = make()
    ahead.loaded(T, [], complete=True)
    ahead.request_read()  # e.g. the consumer was assigned partitions
    assert ahead.must_read(T + S)
    ahead.begin_read()
    ahead.loaded(T + S, [], complete=True)
    assert not ahead.must_read(T + 2 * S)


def test_a_read_requested_while_one_is_under_way_comes_after_it() -> None:
    ahead, _ = make()
    ahead.loaded(T, [], complete=True)
    ahead.begin_read()
    ahead.request_read()  # the read in flight may have passed what the request is about
    ahead.loaded(T + S, [], complete=True)
    assert ahead.must_read(T + 2 * S)
