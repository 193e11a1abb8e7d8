"""What each consumer of a service asks the broker for."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from shared.runtime.kafka import FetchWaitTuner, fetch_wait_for, fetch_wait_tuner


def test_team_routing_polls_its_routing_commands_sooner_than_presence() -> None:
    """A conversation waits for its decision: routing commands are fetched with a 10 ms wait
    (``ROUTING_COMMANDS_FETCH_MAX_WAIT_MS``), agent presence with the service's 40."""
    from services.team_routing.app import TeamRoutingSettings, create_service

    service = create_service(TeamRoutingSettings())
    waits = {s.topics[0].name: s._connection_args["fetch_max_wait_ms"] for s in service.broker.subscribers}
    assert waits == {"routing.commands.v1": 10, "agent.presence.v1": 40}


@pytest.mark.parametrize("module", ["ingest", "team_routing", "conversation_state", "timeout_sweeper", "metrics"])
def test_every_consumer_prefetches_at_most_256_kb_per_partition(module: str) -> None:
    """What a backlog leaves prefetched in memory is bounded per partition (aiokafka's default
    is 1 MB: 30 MB in conversation-state, whose five topics have six partitions each)."""
    import importlib

    app = importlib.import_module(f"services.{module}.app")
    settings_class = next(v for k, v in vars(app).items() if k.endswith("Settings") and k != "ServiceSettings" and isinstance(v, type))
    service = app.create_service(settings_class())
    limits = {s.topics[0].name: s._connection_args["max_partition_fetch_bytes"] for s in service.broker.subscribers}
    assert limits and set(limits.values()) == {262_144}, limits


@pytest.mark.parametrize(
    ("rate", "wait"),
    [
        (0.0, 40),  # idle: polls stay cheap
        (0.2, 10),  # one record in the window: light
        (20.0, 10),
        (99.9, 10),
        (100.0, 40),  # at the threshold: batches stay large
        (2_000.0, 40),
    ],
)
def test_a_light_input_is_fetched_with_the_short_wait(rate: float, wait: int) -> None:
    assert fetch_wait_for(rate, light_wait_ms=10, heavy_wait_ms=40, light_below_per_s=100) == wait


def test_the_tuner_sets_the_fetchers_wait_from_the_last_five_seconds() -> None:
    consumer = SimpleNamespace(_fetcher=SimpleNamespace(_fetch_max_wait_ms=40))
    tuner = FetchWaitTuner(10, 40, light_below_per_s=100, window_s=5)
    seen = []
    for records in [0, 3, 0, 0, 0, 0, 0, 1000, 0, 0, 0, 0, 0, 0]:  # one second each
        tuner.note(records)
        seen.append(tuner.tick(consumer))
        assert consumer._fetcher._fetch_max_wait_ms == seen[-1]
    #        idle, 3 records in the window for 5 s,     500 records over 5 s: 100/s, then light, idle
    assert seen == [40, 10, 10, 10, 10, 10, 40, 40, 40, 40, 40, 40, 40, 40]


def test_the_tuner_leaves_a_consumer_without_a_fetcher_alone() -> None:
    tuner = FetchWaitTuner(10, 40, light_below_per_s=100)
    tuner.note(5)
    assert tuner.tick(None) == 10
    assert tuner.tick(SimpleNamespace()) == 10


@pytest.mark.parametrize(
    ("module", "tuned"),
    [("ingest", True), ("conversation_state", True), ("team_routing", False), ("timeout_sweeper", False), ("metrics", False)],
)
def test_the_consumers_on_the_way_to_a_decision_tune_their_wait(module: str, tuned: bool) -> None:
    import importlib

    app = importlib.import_module(f"services.{module}.app")
    service = app.create_service()
    assert isinstance(service.extras.get("fetch_wait_tuner"), FetchWaitTuner) is tuned


def test_the_tuner_is_off_when_the_light_wait_is_not_shorter() -> None:
    from shared.settings import ServiceSettings

    jobs: list = []
    assert fetch_wait_tuner(ServiceSettings(consumer_fetch_light_wait_ms=40), jobs) is None
    assert jobs == []
    assert fetch_wait_tuner(ServiceSettings(), jobs) is not None
    assert len(jobs) == 1  # its run, started with the service's other background jobs
