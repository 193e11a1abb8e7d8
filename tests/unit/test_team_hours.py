"""Team hours: ``is_open`` and ``next_change`` in the team's own time zone.

Dates used (US rules): 2026-11-16 is a Monday in standard time (Los Angeles UTC-8, New York
UTC-5); US clocks fall back on Sunday 2026-11-01 (02:00 PDT -> 01:00 PST, at 09:00 UTC) and
spring forward on Sunday 2027-03-14 (02:00 PST -> 03:00 PDT, at 10:00 UTC).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from shared.teams import Team, is_open, load_directory, next_change, parse_directory

LA = ZoneInfo("America/Los_Angeles")
NY = ZoneInfo("America/New_York")
DEPLOY_TEAMS = Path(__file__).resolve().parents[2] / "deploy" / "teams.yaml"

WEEKDAYS_8_20 = {day: ["08:00-20:00"] for day in ("mon", "tue", "wed", "thu", "fri")}
EVERY_DAY_8_20 = {day: ["08:00-20:00"] for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}


def make_team(hours: dict[str, list[str]], timezone: str = "America/Los_Angeles", **extra: Any) -> Team:
    """A one-team directory built in code; returns its team."""
    directory = parse_directory(
        {
            "default_team": "t",
            "standard_pool": {"agents": [{"id": "std-1", "max_concurrency": 4}]},
            "teams": [
                {
                    "id": "t",
                    "name": "Test team",
                    "timezone": timezone,
                    "hours": hours,
                    "agents": [{"id": "t-1", "max_concurrency": 4}],
                    **extra,
                }
            ],
        }
    )
    team = directory.team("t")
    assert team is not None
    return team


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def la(*args: int) -> datetime:
    return datetime(*args, tzinfo=LA)


# --- weekly hours ---------------------------------------------------------------------------

WEEKLY = make_team({**WEEKDAYS_8_20, "sat": ["09:00-17:00"]})


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        pytest.param(la(2026, 11, 16, 7, 59), False, id="monday-one-minute-before-opening"),
        pytest.param(la(2026, 11, 16, 7, 59, 59), False, id="monday-one-second-before-opening"),
        pytest.param(la(2026, 11, 16, 8, 0), True, id="monday-exactly-at-opening-is-open"),
        pytest.param(la(2026, 11, 16, 19, 59), True, id="monday-one-minute-before-closing"),
        pytest.param(la(2026, 11, 16, 20, 0), False, id="monday-exactly-at-closing-is-closed"),
        pytest.param(la(2026, 11, 21, 8, 59), False, id="saturday-before-weekend-opening"),
        pytest.param(la(2026, 11, 21, 9, 0), True, id="saturday-at-weekend-opening"),
        pytest.param(la(2026, 11, 21, 16, 59), True, id="saturday-before-weekend-closing"),
        pytest.param(la(2026, 11, 21, 17, 0), False, id="saturday-at-weekend-closing"),
        pytest.param(la(2026, 11, 22, 12, 0), False, id="sunday-without-hours-is-closed"),
        pytest.param(utc(2026, 11, 16, 15, 59), False, id="utc-instant-one-minute-before-local-opening"),
        pytest.param(utc(2026, 11, 16, 16, 0), True, id="utc-instant-at-local-opening"),
        # Monday 02:00 UTC is still Sunday 18:00 in Los Angeles: Sunday's (absent) hours apply.
        pytest.param(utc(2026, 11, 23, 2, 0), False, id="weekday-is-the-local-one-not-utc-monday"),
        # Saturday 01:00 UTC is Friday 17:00 local: Friday's 08-20 apply, not Saturday's 09-17.
        pytest.param(utc(2026, 11, 21, 1, 0), True, id="weekday-is-the-local-one-not-utc-saturday"),
    ],
)
def test_is_open_follows_weekly_hours_at_their_edges(at: datetime, expected: bool) -> None:
    assert is_open(WEEKLY, at) is expected


SEATTLE = make_team(WEEKDAYS_8_20, timezone="America/Los_Angeles")
NEW_YORK = make_team(WEEKDAYS_8_20, timezone="America/New_York")


@pytest.mark.parametrize(
    ("at", "seattle_open", "new_york_open"),
    [
        pytest.param(utc(2026, 11, 16, 13, 0), False, True, id="0500-seattle-0800-new-york"),
        pytest.param(utc(2026, 11, 16, 15, 59), False, True, id="0759-seattle-1059-new-york"),
        pytest.param(utc(2026, 11, 16, 16, 0), True, True, id="0800-seattle-1100-new-york"),
        pytest.param(utc(2026, 11, 17, 0, 59), True, True, id="1659-seattle-1959-new-york"),
        pytest.param(utc(2026, 11, 17, 1, 0), True, False, id="1700-seattle-2000-new-york"),
        pytest.param(utc(2026, 11, 17, 4, 0), False, False, id="2000-seattle-2300-new-york"),
    ],
)
def test_same_hours_in_two_zones_differ_at_the_same_instant(
    at: datetime, seattle_open: bool, new_york_open: bool
) -> None:
    assert (is_open(SEATTLE, at), is_open(NEW_YORK, at)) == (seattle_open, new_york_open)


# --- DST change days -----------------------------------------------------------------------

EVERY_DAY = make_team(EVERY_DAY_8_20)


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        # Saturday before spring forward: PST, 08:00 local is 16:00 UTC.
        pytest.param(utc(2027, 3, 13, 15, 59), False, id="day-before-spring-forward-0759-pst"),
        pytest.param(utc(2027, 3, 13, 16, 0), True, id="day-before-spring-forward-0800-pst"),
        # Spring-forward Sunday: PDT by 08:00, so it opens an hour earlier in UTC.
        pytest.param(utc(2027, 3, 14, 14, 59), False, id="spring-forward-day-0759-pdt"),
        pytest.param(utc(2027, 3, 14, 15, 0), True, id="spring-forward-day-0800-pdt"),
        pytest.param(utc(2027, 3, 15, 2, 59), True, id="spring-forward-day-1959-pdt"),
        pytest.param(utc(2027, 3, 15, 3, 0), False, id="spring-forward-day-2000-pdt"),
        # Saturday before fall back: PDT, 08:00 local is 15:00 UTC.
        pytest.param(utc(2026, 10, 31, 14, 59), False, id="day-before-fall-back-0759-pdt"),
        pytest.param(utc(2026, 10, 31, 15, 0), True, id="day-before-fall-back-0800-pdt"),
        # Fall-back Sunday: PST by 08:00, so it opens an hour later in UTC.
        pytest.param(utc(2026, 11, 1, 15, 0), False, id="fall-back-day-0700-pst"),
        pytest.param(utc(2026, 11, 1, 15, 59), False, id="fall-back-day-0759-pst"),
        pytest.param(utc(2026, 11, 1, 16, 0), True, id="fall-back-day-0800-pst"),
        pytest.param(utc(2026, 11, 2, 3, 59), True, id="fall-back-day-1959-pst"),
        pytest.param(utc(2026, 11, 2, 4, 0), False, id="fall-back-day-2000-pst"),
    ],
)
def test_dst_change_days_open_at_local_0800(at: datetime, expected: bool) -> None:
    assert is_open(EVERY_DAY, at) is expected


@pytest.mark.parametrize(
    ("hours", "at", "expected"),
    [
        # 02:00-03:00 does not exist on 2027-03-14; clocks jump from 01:59:59 PST to 03:00 PDT.
        pytest.param(["02:30-05:00"], utc(2027, 3, 14, 9, 59), False, id="opens-in-skipped-hour-0159-pst"),
        pytest.param(["02:30-05:00"], utc(2027, 3, 14, 10, 0), True, id="opens-in-skipped-hour-open-at-0300-pdt"),
        pytest.param(["02:30-05:00"], utc(2027, 3, 14, 11, 59), True, id="opens-in-skipped-hour-0459-pdt"),
        pytest.param(["02:30-05:00"], utc(2027, 3, 14, 12, 0), False, id="opens-in-skipped-hour-0500-pdt"),
        pytest.param(["00:00-02:30"], utc(2027, 3, 14, 9, 59), True, id="closes-in-skipped-hour-0159-pst"),
        pytest.param(["00:00-02:30"], utc(2027, 3, 14, 10, 0), False, id="closes-in-skipped-hour-0300-pdt"),
        # 01:00-02:00 happens twice on 2026-11-01 (PDT, then PST): wall-clock hours hold in both.
        pytest.param(["00:00-02:00"], utc(2026, 11, 1, 8, 30), True, id="spans-repeated-hour-first-0130"),
        pytest.param(["00:00-02:00"], utc(2026, 11, 1, 9, 30), True, id="spans-repeated-hour-second-0130"),
        pytest.param(["00:00-02:00"], utc(2026, 11, 1, 10, 0), False, id="spans-repeated-hour-0200-pst"),
        pytest.param(["01:00-01:30"], utc(2026, 11, 1, 8, 15), True, id="inside-repeated-hour-first-0115"),
        pytest.param(["01:00-01:30"], utc(2026, 11, 1, 8, 45), False, id="inside-repeated-hour-first-0145"),
        pytest.param(["01:00-01:30"], utc(2026, 11, 1, 9, 15), True, id="inside-repeated-hour-second-0115"),
        pytest.param(["01:00-01:30"], utc(2026, 11, 1, 9, 45), False, id="inside-repeated-hour-second-0145"),
    ],
)
def test_ranges_touching_the_skipped_or_repeated_hour_use_local_wall_clock(
    hours: list[str], at: datetime, expected: bool
) -> None:
    assert is_open(make_team({"sun": hours}), at) is expected


# --- holidays, closures, 24:00 ---------------------------------------------------------------

ALL_WEEKDAYS_ROUND_THE_CLOCK = {day: ["00:00-24:00"] for day in ("mon", "tue", "wed", "thu", "fri")}
WITH_HOLIDAY = make_team(ALL_WEEKDAYS_ROUND_THE_CLOCK, holidays=["2026-11-26"])


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        # 2026-11-26 07:59 UTC is still Wednesday 23:59 in Los Angeles: not the holiday yet.
        pytest.param(utc(2026, 11, 26, 7, 59), True, id="utc-date-is-holiday-local-is-the-day-before"),
        pytest.param(utc(2026, 11, 26, 8, 0), False, id="local-midnight-starts-the-holiday"),
        pytest.param(utc(2026, 11, 26, 20, 0), False, id="middle-of-the-holiday"),
        # 2026-11-27 07:59 UTC is still Thursday 23:59 local: the holiday lasts the whole local day.
        pytest.param(utc(2026, 11, 27, 7, 59), False, id="utc-date-after-holiday-local-still-holiday"),
        pytest.param(utc(2026, 11, 27, 8, 0), True, id="local-midnight-ends-the-holiday"),
    ],
)
def test_holiday_closes_the_whole_local_day(at: datetime, expected: bool) -> None:
    assert is_open(WITH_HOLIDAY, at) is expected


WITH_CLOSURE = make_team(
    WEEKDAYS_8_20,
    closures=[
        {"from": "2026-12-24T14:00", "to": "2026-12-24T16:00"},
        {"from": "2026-12-31T12:00", "to": "2027-01-04T10:00"},
    ],
)


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        pytest.param(la(2026, 12, 24, 13, 59), True, id="one-minute-before-closure"),
        pytest.param(la(2026, 12, 24, 14, 0), False, id="closure-start-is-closed"),
        pytest.param(la(2026, 12, 24, 15, 59), False, id="one-minute-before-closure-end"),
        pytest.param(la(2026, 12, 24, 16, 0), True, id="closure-end-is-open-again"),
        pytest.param(utc(2026, 12, 24, 22, 0), False, id="closure-is-local-time-1400-pst-is-2200-utc"),
        pytest.param(utc(2026, 12, 24, 14, 30), False, id="utc-1430-is-local-0630-before-hours"),
        pytest.param(la(2027, 1, 4, 9, 59), False, id="multi-day-closure-last-minute"),
        pytest.param(la(2027, 1, 4, 10, 0), True, id="multi-day-closure-ended-mid-hours"),
    ],
)
def test_one_off_closure_is_half_open_local_interval(at: datetime, expected: bool) -> None:
    assert is_open(WITH_CLOSURE, at) is expected


EVENING = make_team({"mon": ["18:00-24:00"]})


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        pytest.param(la(2026, 11, 16, 23, 59), True, id="2359"),
        pytest.param(la(2026, 11, 16, 23, 59, 59, 999999), True, id="last-microsecond-of-the-day"),
        pytest.param(la(2026, 11, 17, 0, 0), False, id="midnight-belongs-to-the-next-day"),
    ],
)
def test_2400_ends_the_day_inclusive_of_its_last_instant(at: datetime, expected: bool) -> None:
    assert is_open(EVENING, at) is expected


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: is_open(WEEKLY, datetime(2026, 11, 16, 10, 0)), id="is_open"),
        pytest.param(lambda: next_change(WEEKLY, datetime(2026, 11, 16, 10, 0)), id="next_change"),
    ],
)
def test_naive_datetime_is_rejected(call: Any) -> None:
    with pytest.raises(ValueError, match="aware"):
        call()


# --- next_change ---------------------------------------------------------------------------

OVERNIGHT = make_team({"mon": ["20:00-24:00"], "tue": ["00:00-06:00"]})
NEVER_OPEN = make_team({})
ALWAYS_OPEN = make_team({day: ["00:00-24:00"] for day in EVERY_DAY_8_20})


@pytest.mark.parametrize(
    ("team", "at", "expected"),
    [
        pytest.param(WEEKLY, la(2026, 11, 16, 7, 0), la(2026, 11, 16, 8, 0), id="opens-at-0800"),
        pytest.param(WEEKLY, la(2026, 11, 16, 8, 0), la(2026, 11, 16, 20, 0), id="at-opening-next-is-closing"),
        pytest.param(WEEKLY, la(2026, 11, 16, 19, 59), la(2026, 11, 16, 20, 0), id="one-minute-before-closing"),
        pytest.param(WEEKLY, la(2026, 11, 20, 20, 0), la(2026, 11, 21, 9, 0), id="friday-close-to-saturday-open"),
        pytest.param(WEEKLY, la(2026, 11, 21, 17, 0), la(2026, 11, 23, 8, 0), id="skips-sunday-without-hours"),
        pytest.param(SEATTLE, utc(2026, 11, 16, 13, 0), utc(2026, 11, 16, 16, 0), id="seattle-opens-1600-utc"),
        pytest.param(NEW_YORK, utc(2026, 11, 16, 12, 0), utc(2026, 11, 16, 13, 0), id="new-york-opens-1300-utc"),
        # DST change days: 08:00 local is a different UTC instant on each.
        pytest.param(EVERY_DAY, utc(2027, 3, 14, 9, 0), utc(2027, 3, 14, 15, 0), id="spring-forward-opens-0800-pdt"),
        pytest.param(EVERY_DAY, utc(2027, 3, 13, 17, 0), utc(2027, 3, 14, 4, 0), id="eve-of-spring-forward-closes-2000-pst"),
        pytest.param(EVERY_DAY, utc(2027, 3, 14, 15, 0), utc(2027, 3, 15, 3, 0), id="spring-forward-closes-2000-pdt"),
        pytest.param(EVERY_DAY, utc(2026, 11, 1, 7, 0), utc(2026, 11, 1, 16, 0), id="fall-back-opens-0800-pst"),
        pytest.param(EVERY_DAY, utc(2026, 10, 31, 20, 0), utc(2026, 11, 1, 3, 0), id="eve-of-fall-back-closes-2000-pdt"),
        pytest.param(EVERY_DAY, utc(2026, 11, 1, 16, 0), utc(2026, 11, 2, 4, 0), id="fall-back-closes-2000-pst"),
        # Ranges touching the skipped hour change at the jump itself (03:00 PDT, 10:00 UTC).
        pytest.param(make_team({"sun": ["02:30-05:00"]}), utc(2027, 3, 14, 9, 0), utc(2027, 3, 14, 10, 0), id="opening-in-skipped-hour"),
        pytest.param(make_team({"sun": ["00:00-02:30"]}), utc(2027, 3, 14, 9, 0), utc(2027, 3, 14, 10, 0), id="closing-in-skipped-hour"),
        pytest.param(make_team({"sun": ["02:00-05:00"]}), utc(2027, 3, 14, 9, 0), utc(2027, 3, 14, 10, 0), id="opening-at-skipped-hour-start"),
        # Ranges touching the repeated hour: each occurrence of the wall-clock time counts.
        pytest.param(make_team({"sun": ["00:00-02:00"]}), utc(2026, 11, 1, 7, 0), utc(2026, 11, 1, 10, 0), id="spanning-repeated-hour-closes-0200-pst"),
        pytest.param(make_team({"sun": ["01:00-01:30"]}), utc(2026, 11, 1, 7, 0), utc(2026, 11, 1, 8, 0), id="repeated-hour-first-opening"),
        pytest.param(make_team({"sun": ["01:00-01:30"]}), utc(2026, 11, 1, 8, 0), utc(2026, 11, 1, 8, 30), id="repeated-hour-first-closing"),
        pytest.param(make_team({"sun": ["01:00-01:30"]}), utc(2026, 11, 1, 8, 30), utc(2026, 11, 1, 9, 0), id="repeated-hour-second-opening"),
        pytest.param(make_team({"sun": ["01:00-01:30"]}), utc(2026, 11, 1, 9, 0), utc(2026, 11, 1, 9, 30), id="repeated-hour-second-closing"),
        # Holidays and closures.
        pytest.param(WITH_HOLIDAY, utc(2026, 11, 25, 20, 0), utc(2026, 11, 26, 8, 0), id="holiday-starts-at-local-midnight"),
        pytest.param(WITH_HOLIDAY, utc(2026, 11, 26, 8, 0), utc(2026, 11, 27, 8, 0), id="holiday-ends-at-local-midnight"),
        pytest.param(WITH_CLOSURE, la(2026, 12, 24, 12, 0), la(2026, 12, 24, 14, 0), id="closure-start"),
        pytest.param(WITH_CLOSURE, la(2026, 12, 24, 14, 0), la(2026, 12, 24, 16, 0), id="closure-end"),
        pytest.param(WITH_CLOSURE, la(2026, 12, 31, 11, 0), la(2026, 12, 31, 12, 0), id="multi-day-closure-start"),
        pytest.param(WITH_CLOSURE, la(2026, 12, 31, 12, 0), la(2027, 1, 4, 10, 0), id="multi-day-closure-end"),
        # 24:00 and hours split across midnight.
        pytest.param(EVENING, la(2026, 11, 16, 19, 0), la(2026, 11, 17, 0, 0), id="2400-closes-at-next-midnight"),
        pytest.param(OVERNIGHT, la(2026, 11, 16, 21, 0), la(2026, 11, 17, 6, 0), id="overnight-split-has-no-change-at-midnight"),
        # Nothing changes within the horizon.
        pytest.param(NEVER_OPEN, la(2026, 11, 16, 12, 0), None, id="never-open"),
        pytest.param(ALWAYS_OPEN, la(2026, 11, 16, 12, 0), None, id="always-open"),
    ],
)
def test_next_change_is_the_first_instant_the_state_flips(
    team: Team, at: datetime, expected: datetime | None
) -> None:
    assert next_change(team, at) == expected


@pytest.mark.parametrize(
    ("team", "at"),
    [
        pytest.param(EVERY_DAY, utc(2027, 3, 14, 0, 0), id="spring-forward-day"),
        pytest.param(EVERY_DAY, utc(2026, 11, 1, 0, 0), id="fall-back-day"),
        pytest.param(make_team({"sun": ["02:30-05:00"]}), utc(2027, 3, 14, 0, 0), id="skipped-hour-range"),
        pytest.param(make_team({"sun": ["01:00-01:30"]}), utc(2026, 11, 1, 0, 0), id="repeated-hour-range"),
        pytest.param(WITH_HOLIDAY, utc(2026, 11, 25, 0, 0), id="holiday"),
        pytest.param(WITH_CLOSURE, utc(2026, 12, 24, 0, 0), id="closure"),
    ],
)
def test_next_change_agrees_with_is_open_minute_by_minute(team: Team, at: datetime) -> None:
    """Walk two days minute by minute: every flip of is_open is exactly where next_change said."""
    end = at + timedelta(days=2)
    expected_flips = []
    state, t = is_open(team, at), at
    while t < end:
        t += timedelta(minutes=1)
        if is_open(team, t) != state:
            state = not state
            expected_flips.append(t)
    reported = []
    t = at
    while (t := next_change(team, t)) is not None and t < end:
        reported.append(t)
    assert expected_flips, "the window should contain at least one change"
    assert reported == expected_flips


@pytest.mark.parametrize(
    ("team", "at", "horizon", "expected"),
    [
        pytest.param(WEEKLY, la(2026, 11, 21, 17, 0), timedelta(days=1), None, id="next-opening-beyond-horizon"),
        pytest.param(WEEKLY, la(2026, 11, 21, 17, 0), timedelta(days=2), la(2026, 11, 23, 8, 0), id="next-opening-within-horizon"),
    ],
)
def test_next_change_stops_at_the_horizon(
    team: Team, at: datetime, horizon: timedelta, expected: datetime | None
) -> None:
    assert next_change(team, at, horizon) == expected


# --- the sample configuration ---------------------------------------------------------------


def test_deploy_teams_yaml_validates() -> None:
    directory = load_directory(DEPLOY_TEAMS)
    assert {"pnw-seattle", "midwest-chicago", "northeast-nyc"} <= {t.id for t in directory.teams}
    assert directory.team(directory.default_team) is not None
    seattle = directory.team("pnw-seattle")
    assert seattle is not None
    # Its Christmas Eve closure (local time) and Thanksgiving holiday are in force.
    assert is_open(seattle, la(2026, 12, 24, 13, 59)) is True
    assert is_open(seattle, la(2026, 12, 24, 14, 0)) is False
    assert is_open(seattle, la(2026, 11, 26, 12, 0)) is False
