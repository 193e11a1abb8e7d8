"""conversation-state applies a routing decision only after the message that opened its
conversation, even when a (replayed) batch holds them the other way round."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from services.conversation_state.handlers import OpeningsFirst
from shared.contracts.messages import CustomerMessageReceived
from shared.contracts.routing import ConversationRouted

MSG, DEC = "messages.received.v1", "routing.decisions.v1"


def item(name: str, topic: str, customer: str, conversation: str = "", partition: int = 0) -> SimpleNamespace:
    """A record; a message ``opens`` the conversation named, a decision names its conversation."""
    if topic == DEC:
        payload = ConversationRouted.model_construct(customer_id=customer, conversation_id=conversation)
    else:
        payload = CustomerMessageReceived.model_construct(customer_id=customer)
    return SimpleNamespace(name=name, payload=payload, record=SimpleNamespace(topic=topic, partition=partition), opens=conversation)


def applied_order(batch: list[SimpleNamespace], known_before: set[tuple[str, str]]) -> list[str]:
    """Apply the batch the way the consumer does; applying a message opens its conversation."""
    known = set(known_before)
    order: list[str] = []

    def apply(i: SimpleNamespace) -> None:
        order.append(i.name)
        if i.record.topic == MSG and i.opens:
            known.add((i.payload.customer_id, i.opens))

    gate = OpeningsFirst()
    for i in batch:
        if not gate.hold(i, lambda customer, conversation: (customer, conversation) in known):
            apply(i)
    for i in gate.held:
        apply(i)
    return order


@pytest.mark.parametrize(
    ("batch", "known", "order"),
    [
        # in order: unchanged
        ([item("m1", MSG, "c", "x"), item("d1", DEC, "c", "x")], set(), ["m1", "d1"]),
        # a decision for a conversation opened later in the batch waits for it
        ([item("d1", DEC, "c", "x"), item("m1", MSG, "c", "x")], set(), ["m1", "d1"]),
        # ... with every later record of that customer from the decisions partition, in order
        (
            [item("d1", DEC, "c", "x"), item("d2", DEC, "c", "y"), item("m1", MSG, "c", "x"), item("m2", MSG, "c")],
            {("c", "y")},
            ["m1", "m2", "d1", "d2"],
        ),
        # other customers and other partitions keep their places
        (
            [item("d1", DEC, "c", "x"), item("e1", DEC, "e", "z"), item("d9", DEC, "c", "w", partition=1), item("m1", MSG, "c", "x")],
            {("e", "z"), ("c", "w")},
            ["e1", "d9", "m1", "d1"],
        ),
        # a decision for a conversation that never opens: last, where it is released as before
        ([item("d1", DEC, "c", "gone"), item("m1", MSG, "d")], set(), ["m1", "d1"]),
    ],
)
def test_decisions_wait_for_their_conversation(batch, known, order) -> None:
    assert applied_order(batch, known) == order
