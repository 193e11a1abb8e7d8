"""A service that cannot start says why in one line: a configuration error (an environment
variable, the team directory) ends the process with exit status 2 and no traceback; a store or
broker that does not answer is named (never with the store's credentials); and a stop asked
for while a start-up step waits ends that step at once."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka.errors import KafkaConnectionError
from pydantic import ValidationError
from pydantic_settings import SettingsError
from pymongo.errors import ServerSelectionTimeoutError

from services.ingest.app import IngestSettings
from shared.runtime.kafka import MissingTopics
from shared.runtime.service import (
    EXIT_CONFIGURATION,
    StartupStopped,
    configuration_problem,
    startup_failure,
    until_stop_requested,
)
from shared.settings import ServiceSettings
from shared.teams import TeamConfigError

REPO = Path(__file__).resolve().parents[2]


def settings_error(**env: str) -> Exception:
    """What building a service's settings raises with these environment variables."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        IngestSettings()
    except Exception as exc:
        return exc
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    raise AssertionError(f"settings accepted {env}")


# ---------------------------------------------------------------------- configuration errors
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"CONSUMER_BATCH_MAX_RECORDS": "many"},
            "invalid settings: CONSUMER_BATCH_MAX_RECORDS: Input should be a valid integer, unable to parse string as an integer",
        ),
        ({"CONSUMER_BATCH_MAX_RECORDS": "0"}, "invalid settings: CONSUMER_BATCH_MAX_RECORDS: Input should be greater than or equal to 1"),
        ({"GC_THRESHOLDS": "[1, 2"}, "invalid settings: GC_THRESHOLDS: not a valid JSON value"),
    ],
)
def test_a_bad_setting_is_named_by_its_variable(env, expected):
    assert configuration_problem(settings_error(**env)) == expected


def test_a_bad_setting_is_named_without_its_value():
    problem = configuration_problem(settings_error(MONGODB_TIMEOUT_MS="s3cret-token"))
    assert problem is not None and problem.startswith("invalid settings: MONGODB_TIMEOUT_MS: ")
    assert "s3cret" not in problem


def test_a_missing_team_directory_names_its_setting():
    assert configuration_problem(TeamConfigError("team configuration x.yaml does not exist")) == (
        "team configuration x.yaml does not exist (TEAMS_CONFIG)"
    )


@pytest.mark.parametrize("exc", [ValueError("x"), RuntimeError("y"), KeyError("z")])
def test_other_errors_are_not_configuration_problems(exc):
    assert configuration_problem(exc) is None


def test_a_validation_error_of_something_else_is_not_a_configuration_problem():
    from shared.contracts.messages import CustomerMessageReceived

    with pytest.raises(ValidationError) as failed:
        CustomerMessageReceived.model_validate({})
    assert configuration_problem(failed.value) is None
    assert isinstance(settings_error(GC_THRESHOLDS="x"), SettingsError)


@pytest.mark.parametrize(
    ("service", "env", "said"),
    [
        ("ingest", {"CONSUMER_BATCH_MAX_RECORDS": "many"}, "cannot start: invalid settings: CONSUMER_BATCH_MAX_RECORDS: "),
        ("metrics", {"TEAMS_CONFIG": "/nowhere/teams.yaml"}, "cannot start: team configuration /nowhere/teams.yaml does not exist (TEAMS_CONFIG)"),
    ],
)
def test_a_service_with_a_configuration_error_exits_with_one_line(service, env, said):
    run = subprocess.run(
        [sys.executable, "-m", f"services.{service}"],
        cwd=REPO,
        env={**{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}, "PYTHONPATH": str(REPO), "HTTP_PORT": "0", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == EXIT_CONFIGURATION, run.stderr
    lines = [json.loads(line) for line in (run.stdout + run.stderr).splitlines()]
    assert len(lines) == 1, lines
    assert lines[0]["level"] == "error" and lines[0]["service"] == service
    assert lines[0]["msg"].startswith(said)


# ---------------------------------------------------------------------- start-up failures
SETTINGS = ServiceSettings(
    mongodb_url="mongodb://app:pa55word@db-1.internal:27017,db-2.internal:27018/hometeam?replicaSet=rs0&authSource=admin",
    mongodb_timeout_ms=2_500,
    kafka_bootstrap_servers="kafka-1:9092,kafka-2:9092",
)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (MissingTopics("topics missing after 1 s: a, b"), "topics missing after 1 s: a, b"),
        (StartupStopped("stopped while preparing the store"), "stopped while preparing the store"),
        (
            ServerSelectionTimeoutError("db-1.internal:27017: timed out"),
            "the store did not answer within 2.5 s (db-1.internal:27017, db-2.internal:27018; MONGODB_URL, MONGODB_TIMEOUT_MS): ServerSelectionTimeoutError",
        ),
        (
            KafkaConnectionError("Unable to bootstrap from [('kafka-1', 9092, <AddressFamily.AF_UNSPEC: 0>)]"),
            "Kafka did not answer at kafka-1:9092,kafka-2:9092 (KAFKA_BOOTSTRAP_SERVERS): KafkaConnectionError: Unable to bootstrap from",
        ),
        (RuntimeError("boom"), "RuntimeError: boom"),
    ],
)
def test_a_failed_start_up_says_why(exc, expected):
    said = startup_failure(exc, SETTINGS)
    assert said.startswith(expected)
    assert "pa55word" not in said and "app:" not in said


def test_a_store_url_that_does_not_parse_is_not_echoed():
    settings = ServiceSettings(mongodb_url="mongodb://user:pw@", mongodb_timeout_ms=100)
    said = startup_failure(ServerSelectionTimeoutError("x"), settings)
    assert "pw" not in said and "MONGODB_URL (not a valid MongoDB URL)" in said


# ---------------------------------------------------------------------- a stop during start-up
async def test_a_start_up_step_that_ends_gives_its_result():
    async def step() -> str:
        await asyncio.sleep(0.01)
        return "indexes"

    assert await until_stop_requested(step(), lambda: False, "preparing the store", poll_s=0.001) == "indexes"


async def test_a_start_up_step_that_fails_raises_its_error():
    async def step() -> None:
        raise ServerSelectionTimeoutError("no store")

    with pytest.raises(ServerSelectionTimeoutError):
        await until_stop_requested(step(), lambda: False, "preparing the store", poll_s=0.001)


async def test_a_stop_request_ends_a_waiting_start_up_step_at_once():
    cancelled = asyncio.Event()
    polls = 0

    async def step() -> None:
        try:
            await asyncio.sleep(3600)  # a store that never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def stop_requested() -> bool:
        nonlocal polls
        polls += 1
        return polls > 3  # a signal came after three polls

    with pytest.raises(StartupStopped, match="stopped while preparing the store"):
        await asyncio.wait_for(until_stop_requested(step(), stop_requested, "preparing the store", poll_s=0.001), 5)
    assert cancelled.is_set()
