"""The outbox producer's partitioner puts every key where aiokafka's (and Java's) default
partitioner puts it, and remembers a bounded number of keys."""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner

from shared.runtime.kafka import RememberingPartitioner, build_producer
from shared.settings import ServiceSettings

KEYS = [b"", b"a", b"customer-1", "sms|+15551234567".encode(), "ünïcode|key".encode(), bytes(range(256))]


@pytest.mark.parametrize("partitions", [1, 2, 3, 6, 12, 64])
@pytest.mark.parametrize("key", KEYS)
def test_same_partition_as_the_default_partitioner(key: bytes, partitions: int) -> None:
    all_partitions = list(range(partitions))
    partitioner = RememberingPartitioner()
    expected = DefaultPartitioner()(key, all_partitions, all_partitions)
    assert partitioner(key, all_partitions, all_partitions) == expected
    assert partitioner(key, all_partitions, all_partitions) == expected  # remembered


def test_a_remembered_key_follows_a_change_in_partition_count() -> None:
    partitioner = RememberingPartitioner()
    key = b"customer-42"
    for count in (3, 6, 7):
        parts = list(range(count))
        assert partitioner(key, parts, parts) == DefaultPartitioner()(key, parts, parts)


def test_memory_is_bounded_and_answers_stay_right() -> None:
    partitioner = RememberingPartitioner(max_keys=10)
    parts = list(range(6))
    for n in range(35):
        key = f"k{n}".encode()
        assert partitioner(key, parts, parts) == DefaultPartitioner()(key, parts, parts)
        assert len(partitioner._hashes) <= 10


def test_no_key_goes_to_an_available_partition() -> None:
    partitioner = RememberingPartitioner()
    for _ in range(20):
        assert partitioner(None, [0, 1, 2, 3], [1, 3]) in (1, 3)
    assert partitioner._hashes == {}


async def test_the_outbox_producer_uses_it() -> None:
    producer = build_producer(ServiceSettings(service_name="test"))
    try:
        assert isinstance(producer._partitioner, RememberingPartitioner)
    finally:
        await producer.stop()

