"""conversation-state reads nothing for a customer ingest just created, but only when the
message cannot be a replay: at or past the end its partition had when the consumer took it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition

from services.conversation_state.handlers import FreshRecords
from shared.contracts.messages import CustomerMessageReceived
from shared.contracts.routing import ConversationRouted

MSG, DEC = "messages.received.v1", "routing.decisions.v1"
END = 100  # every partition's end when first asked


def item(customer: str, offset: int, new: bool = True, topic: str = MSG, partition: int = 0) -> SimpleNamespace:
    if topic == MSG:
        payload = CustomerMessageReceived.model_construct(customer_id=customer, new_customer=new)
    else:
        payload = ConversationRouted.model_construct(customer_id=customer, conversation_id="conv")
    return SimpleNamespace(payload=payload, record=SimpleNamespace(topic=topic, partition=partition, offset=offset))


class Ends:
    def __init__(self) -> None:
        self.asked: list[list[TopicPartition]] = []

    async def __call__(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.asked.append(sorted(partitions))
        return {tp: END for tp in partitions}


@pytest.mark.parametrize(
    ("batch", "new"),
    [
        ([item("a", END)], {"a"}),  # flagged, published after the consumer took the partition
        ([item("a", END + 5)], {"a"}),
        ([item("a", END - 1)], set()),  # may be a replay of what the previous owner handled
        ([item("a", END, new=False)], set()),  # not flagged
        ([item("a", END, topic=DEC)], set()),  # only messages create customers
        ([item("a", END - 1), item("b", END), item("c", END + 1, new=False)], {"b"}),
    ],
)
async def test_only_flagged_messages_past_the_partition_end_count_as_new(batch, new) -> None:
    assert await FreshRecords(Ends()).new_customers(batch, epoch=0) == new


async def test_boundaries_are_read_once_per_partition_and_again_after_a_rebalance() -> None:
    ends = Ends()
    fresh = FreshRecords(ends)
    await fresh.new_customers([item("a", END), item("b", END, partition=1)], epoch=0)
    await fresh.new_customers([item("c", END + 1)], epoch=0)
    assert ends.asked == [[TopicPartition(MSG, 0), TopicPartition(MSG, 1)]]
    # A rebalance (the cache epoch moves): what was past the end may now be a replay.
    assert await fresh.new_customers([item("d", END + 1)], epoch=1) == {"d"}
    assert ends.asked[-1] == [TopicPartition(MSG, 0)]


async def test_without_a_consumer_to_ask_every_customer_is_read() -> None:
    assert await FreshRecords(None).new_customers([item("a", 10**9)], epoch=0) == set()
