"""A starting service waits for its input topics a bounded time, then names what is missing;
a stop asked for meanwhile ends the wait at once."""

from __future__ import annotations

import logging

import pytest

from shared.runtime.kafka import MissingTopics, wait_for_topics


class Cluster:
    """Topics that appear after so many metadata requests; a clock that each request moves."""

    def __init__(self, appear: dict[str, int], interval_s: float = 1.0) -> None:
        self.appear = appear
        self.asked = 0
        self.now = 0.0
        self.interval_s = interval_s

    async def existing(self) -> set[str]:
        self.asked += 1
        self.now = (self.asked - 1) * self.interval_s  # (the wait between requests)
        return {t for t, after in self.appear.items() if self.asked > after}

    def clock(self) -> float:
        return self.now


async def wait(cluster: Cluster, wanted: list[str], timeout_s: float = 10.0, stop=lambda: False) -> None:
    await wait_for_topics(cluster.existing, wanted, timeout_s, stop, interval_s=0, clock=cluster.clock)


@pytest.mark.parametrize(
    ("appear", "wanted", "requests"),
    [
        ({"a": 0, "b": 0}, ["a", "b"], 1),  # there already: one request
        ({"a": 0, "b": 3}, ["a", "b"], 4),  # b appears at the fourth request
        ({"a": 0, "b": 3, "c": 99}, ["a", "b"], 4),  # a topic nobody wants is not waited for
        ({}, [], 1),
    ],
)
async def test_returns_once_every_wanted_topic_exists(appear, wanted, requests) -> None:
    cluster = Cluster(appear)
    await wait(cluster, wanted)
    assert cluster.asked == requests


async def test_names_the_missing_topics_once_the_wait_is_over(caplog) -> None:
    cluster = Cluster({"t.b": 0, "t.c": 99, "t.a": 99})
    with caplog.at_level(logging.WARNING, logger="hometeam.kafka"):
        with pytest.raises(MissingTopics, match=r"topics missing after 5 s: t\.a, t\.c \(create them: scripts/stack_probe\.py create-topics"):
            await wait(cluster, ["t.c", "t.b", "t.a", "t.a"], timeout_s=5)
    assert cluster.asked == 6  # at 0, 1, ..., 5 s
    warnings = [r.getMessage() for r in caplog.records if r.name == "hometeam.kafka"]
    assert warnings == ["waiting up to 5 s for topics to exist: t.a, t.c"]  # once, not per request


async def test_a_stop_asked_for_ends_the_wait_at_once() -> None:
    cluster = Cluster({"a": 99})
    stop = lambda: cluster.asked >= 2  # noqa: E731  # a signal after the second request
    with pytest.raises(MissingTopics, match="stopped while waiting for topics to exist: a"):
        await wait(cluster, ["a"], timeout_s=60, stop=stop)
    assert cluster.asked == 2


async def test_a_zero_wait_asks_once() -> None:
    cluster = Cluster({"a": 1})
    with pytest.raises(MissingTopics):
        await wait(cluster, ["a"], timeout_s=0)
    assert cluster.asked == 1


def test_a_service_waits_for_the_topics_it_reads_their_dead_letter_topics_and_the_ones_it_writes() -> None:
    from services.conversation_state.app import ConversationStateSettings, create_service
    from shared.runtime.kafka import broker_topics

    service = create_service(ConversationStateSettings(kafka_topic_prefix="p."))
    reads = {"messages.received.v1", "agent.actions.v1", "routing.decisions.v1", "customers.commands.v1", "lifecycle.commands.v1"}
    writes = {"messages.outbound.v1", "conversations.events.v1", "routing.commands.v1"}
    dead_letters = {t + ".dlq" for t in reads}
    assert sorted(set(broker_topics(service.broker, "p."))) == sorted("p." + t for t in reads | dead_letters | writes)
