"""The team directory: config validation with clear errors, the home-team lookup, and the
watcher that reloads the file when it changes (keeping the last good directory)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.contracts.common import Channel
from shared.teams import DirectoryWatcher, TeamConfigError, TeamDirectory, home_team_for, parse_directory

Config = dict[str, Any]


def valid_config() -> Config:
    """Two teams and a standard pool; every bad case below changes exactly one thing."""
    return {
        "default_team": "central",
        "standard_pool": {"agents": [{"id": "std-1", "max_concurrency": 4}]},
        "teams": [
            {
                "id": "west",
                "name": "West",
                "timezone": "America/Los_Angeles",
                "regions": {"zip_prefixes": ["98", "970"], "area_codes": ["206", "503"], "markets": ["seattle"]},
                "hours": {"mon": ["08:00-12:00", "12:00-20:00"], "sat": ["09:00-17:00"]},
                "closures": [{"from": "2026-12-24T14:00", "to": "2026-12-25T00:00"}],
                "agents": [{"id": "w-1", "max_concurrency": 4}],
            },
            {
                "id": "east",
                "name": "East",
                "timezone": "America/New_York",
                "regions": {"zip_prefixes": ["981", "100"], "area_codes": ["212"], "markets": ["new-york"]},
                "hours": {"mon": ["07:00-22:00"]},
                "agents": [{"id": "e-1", "max_concurrency": 4}],
            },
            {
                "id": "central",
                "name": "Central",
                "timezone": "America/Chicago",
                "hours": {"mon": ["08:00-24:00"]},
                "agents": [{"id": "c-1", "max_concurrency": 4}],
            },
        ],
    }


def west(config: Config) -> Config:
    return config["teams"][0]


def test_the_base_config_is_valid() -> None:
    """Control for the table below: each bad case fails because of its one change."""
    directory = parse_directory(valid_config())
    assert [t.id for t in directory.teams] == ["west", "east", "central"]
    assert directory.pool_of_agent("w-1") == "west"
    assert directory.pool_of_agent("std-1") == "standard"


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        pytest.param(
            lambda c: west(c).update(timezone="Mars/Olympus_Mons"),
            ["teams.0.timezone", "unknown time zone 'Mars/Olympus_Mons'"],
            id="unknown-time-zone",
        ),
        pytest.param(
            lambda c: west(c)["hours"].update(funday=["08:00-10:00"]),
            ["teams.0.hours", "unknown weekday 'funday'"],
            id="bad-weekday",
        ),
        pytest.param(
            lambda c: west(c)["hours"].update(Monday=["08:00-10:00"]),
            ["teams.0.hours", "unknown weekday 'Monday'"],
            id="weekday-spelled-out",
        ),
        pytest.param(
            lambda c: west(c)["hours"].update(mon=["8:00-20:00"]),
            ["teams.0.hours", "'8:00-20:00'", "HH:MM-HH:MM"],
            id="range-single-digit-hour",
        ),
        pytest.param(
            lambda c: west(c)["hours"].update(mon=["08:00 to 20:00"]),
            ["teams.0.hours", "'08:00 to 20:00'", "HH:MM-HH:MM"],
            id="range-without-dash",
        ),
        pytest.param(
            lambda c: west(c)["hours"].update(mon=["08:00-24:30"]),
            ["teams.0.hours", "'08:00-24:30'", "invalid time"],
            id="range-past-2400",
        ),
        pytest.param(
            lambda c: west(c)["hours"].update(mon=["08:60-20:00"]),
            ["teams.0.hours", "'08:60-20:00'", "invalid time"],
            id="range-minute-60",
        ),
        pytest.param(
            lambda c: west(c)["hours"].update(mon="08:00-20:00"),
            ["teams.0.hours", "hours for mon must be a list"],
            id="day-not-a-list",
        ),
        pytest.param(
            lambda c: west(c)["hours"].update(mon=["20:00-08:00"]),
            ["teams.0.hours", "'20:00-08:00'", "ends before it starts"],
            id="range-end-before-start",
        ),
        pytest.param(
            lambda c: west(c)["hours"].update(mon=["08:00-08:00"]),
            ["teams.0.hours", "'08:00-08:00'", "ends before it starts"],
            id="range-empty",
        ),
        pytest.param(
            lambda c: west(c)["hours"].update(mon=["08:00-12:00", "11:59-14:00"]),
            ["teams.0.hours", "overlap on mon"],
            id="overlapping-ranges",
        ),
        pytest.param(
            lambda c: west(c)["hours"].update(tue=["13:00-18:00", "08:00-14:00"]),
            ["teams.0.hours", "overlap on tue"],
            id="overlapping-ranges-out-of-order",
        ),
        pytest.param(
            lambda c: c["teams"][1].update(id="west"),
            ["duplicate team ids", "'west'"],
            id="duplicate-team-id",
        ),
        pytest.param(
            lambda c: c["teams"][1]["agents"].append({"id": "w-1", "max_concurrency": 2}),
            ["agents listed in more than one pool", "'w-1'"],
            id="agent-in-two-teams",
        ),
        pytest.param(
            lambda c: c["standard_pool"]["agents"].append({"id": "e-1", "max_concurrency": 2}),
            ["agents listed in more than one pool", "'e-1'"],
            id="agent-in-team-and-standard-pool",
        ),
        pytest.param(
            lambda c: c.update(default_team="nowhere"),
            ["default_team 'nowhere'", "is not a team"],
            id="default-team-unknown",
        ),
        pytest.param(
            lambda c: c["teams"][1]["regions"]["zip_prefixes"].append("970"),
            ["zip_prefixes '970'", "west", "east"],
            id="zip-prefix-served-by-two-teams",
        ),
        pytest.param(
            lambda c: c["teams"][1]["regions"]["area_codes"].append("206"),
            ["area_codes '206'", "west", "east"],
            id="area-code-served-by-two-teams",
        ),
        pytest.param(
            lambda c: c["teams"][1]["regions"]["markets"].append("seattle"),
            ["markets 'seattle'", "west", "east"],
            id="market-served-by-two-teams",
        ),
        pytest.param(
            lambda c: c["teams"][1].update(id="standard"),
            ["'standard' is reserved"],
            id="reserved-id-standard",
        ),
        pytest.param(
            lambda c: west(c)["closures"].append({"from": "2026-12-31T12:00Z", "to": "2027-01-01T00:00"}),
            ["teams.0.closures.1", "give no UTC offset"],
            id="closure-start-with-utc-offset",
        ),
        pytest.param(
            lambda c: west(c)["closures"].append({"from": "2026-12-31T12:00", "to": "2027-01-01T00:00-08:00"}),
            ["teams.0.closures.1", "give no UTC offset"],
            id="closure-end-with-utc-offset",
        ),
        pytest.param(
            lambda c: west(c)["closures"].append({"from": "2026-12-31T12:00", "to": "2026-12-31T11:00"}),
            ["teams.0.closures.1", "closure ends", "before it starts"],
            id="closure-ends-before-start",
        ),
        pytest.param(
            lambda c: west(c)["closures"].append({"from": "2026-12-31T12:00", "to": "2026-12-31T12:00"}),
            ["teams.0.closures.1", "closure ends"],
            id="closure-empty",
        ),
    ],
)
def test_bad_config_raises_error_naming_the_field(change: Callable[[Config], Any], fragments: list[str]) -> None:
    config = valid_config()
    change(config)
    with pytest.raises(TeamConfigError) as raised:
        parse_directory(config, source="teams-under-test.yaml")
    message = str(raised.value)
    assert "teams-under-test.yaml" in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda c: west(c)["hours"].update(mon=["08:00-12:00", "12:00-20:00"]), id="adjacent-ranges"),
        pytest.param(lambda c: west(c)["hours"].update(mon=["00:00-24:00"]), id="whole-day-with-2400"),
        pytest.param(lambda c: c["teams"][1]["regions"]["zip_prefixes"].append("9"), id="nested-zip-prefixes-across-teams"),
        pytest.param(lambda c: west(c)["regions"]["zip_prefixes"].append("98"), id="same-prefix-twice-in-one-team"),
    ],
)
def test_edge_configs_that_are_valid(change: Callable[[Config], Any]) -> None:
    config = valid_config()
    change(config)
    assert isinstance(parse_directory(config), TeamDirectory)


# --- home_team_for -------------------------------------------------------------------------

DIRECTORY = parse_directory(valid_config())
WEST_PHONE, EAST_PHONE, UNSERVED_PHONE = "+12065550100", "+12125550100", "+13125550100"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param(
            {"channel": Channel.SMS, "address": EAST_PHONE, "zip_code": "10001", "market": "seattle"},
            ("west", "market"),
            id="market-beats-zip-and-area-code",
        ),
        pytest.param(
            {"channel": Channel.SMS, "address": WEST_PHONE, "zip_code": "98001", "market": "atlantis"},
            ("west", "zip"),
            id="unknown-market-falls-through-to-zip",
        ),
        pytest.param(
            {"channel": Channel.SMS, "address": EAST_PHONE, "zip_code": "98001"},
            ("west", "zip"),
            id="zip-beats-area-code",
        ),
        pytest.param(
            {"channel": Channel.APP, "address": "app-user-1", "zip_code": "98101"},
            ("east", "zip"),
            id="longest-zip-prefix-wins-981-over-98",
        ),
        pytest.param(
            {"channel": Channel.APP, "address": "app-user-1", "zip_code": "98001"},
            ("west", "zip"),
            id="shorter-prefix-when-longer-does-not-match",
        ),
        pytest.param(
            {"channel": Channel.SMS, "address": WEST_PHONE, "zip_code": "00501"},
            ("west", "area_code"),
            id="unmatched-zip-falls-through-to-area-code",
        ),
        pytest.param(
            {"channel": Channel.SMS, "address": EAST_PHONE},
            ("east", "area_code"),
            id="sms-nanp-area-code",
        ),
        pytest.param(
            {"channel": Channel.APP, "address": EAST_PHONE},
            ("central", "default"),
            id="area-code-ignored-for-app",
        ),
        pytest.param(
            {"channel": Channel.BUSINESS_CHAT, "address": EAST_PHONE},
            ("central", "default"),
            id="area-code-ignored-for-business-chat",
        ),
        pytest.param(
            {"channel": Channel.SMS, "address": "+442125550100"},
            ("central", "default"),
            id="non-nanp-number-with-matching-digits",
        ),
        pytest.param(
            {"channel": Channel.SMS, "address": "2125550100"},
            ("central", "default"),
            id="number-without-plus-one",
        ),
        pytest.param(
            {"channel": Channel.SMS, "address": "+1212555010"},
            ("central", "default"),
            id="nanp-number-too-short",
        ),
        pytest.param(
            {"channel": Channel.SMS, "address": UNSERVED_PHONE},
            ("central", "default"),
            id="area-code-no-team-serves",
        ),
        pytest.param(
            {"channel": Channel.APP, "address": "app-user-1", "zip_code": "00501", "market": "atlantis"},
            ("central", "default"),
            id="nothing-matches",
        ),
        pytest.param(
            {"channel": Channel.APP, "address": "app-user-1"},
            ("central", "default"),
            id="no-hints-at-all",
        ),
    ],
)
def test_home_team_for_prefers_market_then_zip_then_area_code_then_default(
    kwargs: dict[str, Any], expected: tuple[str, str]
) -> None:
    assert home_team_for(DIRECTORY, **kwargs) == expected


# --- DirectoryWatcher ----------------------------------------------------------------------


def write_config(path: Path, config: Config | str) -> None:
    """Write the file and move its mtime forward, so the change is seen whatever the clock
    granularity of the file system."""
    previous = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config), encoding="utf-8")
    bumped = max(previous, path.stat().st_mtime_ns) + 1_000_000_000
    os.utime(path, ns=(bumped, bumped))


def with_default(team_id: str) -> Config:
    config = valid_config()
    config["default_team"] = team_id
    return config


def test_watcher_without_a_change_does_not_reload(tmp_path: Path) -> None:
    path = tmp_path / "teams.yaml"
    write_config(path, valid_config())
    watcher = DirectoryWatcher(path)
    before = watcher.current
    assert watcher.reload_if_changed() is False
    assert watcher.current is before


def test_watcher_picks_up_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "teams.yaml"
    write_config(path, valid_config())
    watcher = DirectoryWatcher(path)
    assert watcher.current.default_team == "central"
    write_config(path, with_default("east"))
    assert watcher.reload_if_changed() is True
    assert watcher.current.default_team == "east"


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(with_default("nowhere"), id="invalid-config"),
        pytest.param("teams: [unclosed\n", id="invalid-yaml"),
        pytest.param("", id="empty-file"),
    ],
)
def test_watcher_keeps_the_last_good_directory_when_the_new_file_is_invalid(tmp_path: Path, bad: Config | str) -> None:
    path = tmp_path / "teams.yaml"
    write_config(path, valid_config())
    watcher = DirectoryWatcher(path)
    good = watcher.current
    write_config(path, bad)
    assert watcher.reload_if_changed() is False
    assert watcher.current is good
    # Once the file is fixed, the next change is picked up.
    write_config(path, with_default("west"))
    assert watcher.reload_if_changed() is True
    assert watcher.current.default_team == "west"


def test_watcher_keeps_the_directory_when_the_file_disappears(tmp_path: Path) -> None:
    path = tmp_path / "teams.yaml"
    write_config(path, valid_config())
    watcher = DirectoryWatcher(path)
    good = watcher.current
    path.unlink()
    assert watcher.reload_if_changed() is False
    assert watcher.current is good


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        pytest.param(None, "does not exist", id="missing-file"),
        pytest.param("teams: [unclosed\n", "not valid YAML", id="invalid-yaml"),
        pytest.param(with_default("nowhere"), "default_team 'nowhere'", id="invalid-config"),
    ],
)
def test_watcher_refuses_to_start_without_a_valid_file(tmp_path: Path, content: Config | str | None, fragment: str) -> None:
    path = tmp_path / "teams.yaml"
    if content is not None:
        write_config(path, content)
    with pytest.raises(TeamConfigError) as raised:
        DirectoryWatcher(path)
    assert fragment in str(raised.value)
    assert str(path) in str(raised.value)
