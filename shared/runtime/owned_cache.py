"""State a consumer keeps between batches for the entities it is the single writer of.

A key's records all reach one consumer (keyed topics, range assignment), so while that
consumer keeps its partitions nobody else writes the key's documents, and what it stored at
the end of its last batch is still what the store holds: the next batch can start from memory
instead of reading the store again (FerretDB answers a point read in ~0.6 ms of CPU, the
whole budget of a message at a few thousand messages per second).

The cache is only as good as that ownership, so it is dropped whole:
- when the group rebalances (partitions revoked or assigned): another consumer may have
  written the keys in between;
- when a batch fails: its in-memory changes (and applied offsets) were never stored, and the
  batch will be delivered again.

A batch records the cache's epoch when it starts and puts its state back only if no
invalidation happened meanwhile (a rebalance can run while a batch is in flight).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from aiokafka import ConsumerRebalanceListener, TopicPartition

V = TypeVar("V")


class OwnedStateCache(Generic[V]):
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.epoch = 0
        self._entries: OrderedDict[str, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def invalidate(self) -> None:
        self._entries.clear()
        self.epoch += 1

    def take(self, keys: Iterable[str]) -> dict[str, V]:
        """The cached states of these keys (absent keys are left out). They are removed from
        the cache while the batch works on them and come back with ``put_back``."""
        found: dict[str, V] = {}
        for key in keys:
            value = self._entries.pop(key, None)
            if value is not None:
                found[key] = value
        return found

    def put_back(self, states: dict[str, V], epoch: int) -> None:
        """Keep the states a batch stored, unless the cache was invalidated since ``epoch``."""
        if epoch != self.epoch or self.max_entries <= 0:
            return
        for key, value in states.items():
            self._entries[key] = value
            self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def rebalance_listener(self) -> ConsumerRebalanceListener:
        return invalidate_on_rebalance(self)


def invalidate_on_rebalance(
    *caches: OwnedStateCache[Any], on_assigned: Callable[[], None] | None = None
) -> ConsumerRebalanceListener:
    """A listener for the subscriber whose partitions own these caches' keys; ``on_assigned``
    is also called once partitions are assigned."""
    return _InvalidateOnRebalance(caches, on_assigned)


class _InvalidateOnRebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    # Coroutines, so they run on the event loop between batches: FastStream calls a listener's
    # plain methods in a worker thread, where an invalidation could land between a batch's
    # epoch check and its ``put_back``, and the batch would put back stale values.
    def __init__(self, caches: tuple[OwnedStateCache[Any], ...], on_assigned: Callable[[], None] | None = None) -> None:
        self.caches = caches
        self.on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        for cache in self.caches:
            cache.invalidate()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        for cache in self.caches:
            cache.invalidate()
        if self.on_assigned is not None:
            self.on_assigned()
