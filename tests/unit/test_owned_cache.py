"""The single-writer state cache: what a batch takes, puts back, and what invalidation drops."""

from __future__ import annotations

import asyncio
import inspect

import pytest
from aiokafka import TopicPartition

from shared.runtime.owned_cache import OwnedStateCache, invalidate_on_rebalance


def test_a_batch_takes_what_the_previous_one_put_back() -> None:
    cache = OwnedStateCache[dict](10)
    cache.put_back({"a": {"n": 1}, "b": {"n": 2}}, cache.epoch)
    assert cache.take(["a", "c"]) == {"a": {"n": 1}}
    assert len(cache) == 1  # taken entries are out while a batch works on them


def test_a_failed_batch_leaves_nothing_of_what_it_took() -> None:
    cache = OwnedStateCache[dict](10)
    cache.put_back({"a": {"n": 1}}, cache.epoch)
    taken = cache.take(["a"])
    taken["a"]["n"] = 99  # changed in memory, never stored: the batch fails, no put_back
    assert cache.take(["a"]) == {}


@pytest.mark.parametrize("event", ["revoked", "assigned"])
def test_a_rebalance_drops_everything_and_a_batch_in_flight_does_not_put_back(event: str) -> None:
    customers, buckets = OwnedStateCache[dict](10), OwnedStateCache[dict](10)
    customers.put_back({"a": {}}, customers.epoch)
    buckets.put_back({"h": {}}, buckets.epoch)
    in_flight = customers.epoch
    listener = invalidate_on_rebalance(customers, buckets)
    asyncio.run(getattr(listener, f"on_partitions_{event}")({TopicPartition("t", 0)}))
    assert len(customers) == len(buckets) == 0
    customers.put_back({"b": {}}, in_flight)  # the batch that started before the rebalance
    assert customers.take(["b"]) == {}


def test_a_listener_also_tells_who_asked_once_partitions_are_assigned() -> None:
    calls: list[str] = []
    listener = invalidate_on_rebalance(OwnedStateCache[dict](10), on_assigned=lambda: calls.append("assigned"))
    asyncio.run(listener.on_partitions_revoked({TopicPartition("t", 0)}))
    assert calls == []
    asyncio.run(listener.on_partitions_assigned({TopicPartition("t", 0)}))
    assert calls == ["assigned"]


def test_the_listener_runs_on_the_event_loop_not_in_a_worker_thread() -> None:
    """FastStream runs a listener's plain methods in a thread pool; coroutines on the loop."""
    listener = invalidate_on_rebalance(OwnedStateCache[dict](10))
    assert inspect.iscoroutinefunction(listener.on_partitions_revoked)
    assert inspect.iscoroutinefunction(listener.on_partitions_assigned)


@pytest.mark.parametrize(("size", "kept"), [(0, []), (2, ["b", "c"]), (5, ["a", "b", "c"])])
def test_the_least_recently_stored_go_first(size: int, kept: list[str]) -> None:
    cache = OwnedStateCache[int](size)
    for key, value in (("a", 1), ("b", 2), ("c", 3)):
        cache.put_back({key: value}, cache.epoch)
    assert sorted(cache.take(["a", "b", "c"])) == kept
