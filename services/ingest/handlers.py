"""Ingest's consumer of ``channel.inbound.v1``: resolve each message's customer and publish
the normalized message keyed by customer to ``messages.received.v1``.

Duplicates (a provider retry, a redelivery) get the same message id and are dropped by
conversation-state, which owns the customer's state.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka import ConsumerRecord

from shared.contracts.channel import ChannelMessagePosted
from shared.contracts.envelope import derived_id
from shared.contracts.registry import MESSAGES_RECEIVED
from shared.runtime.decoding import BatchReader
from shared.runtime.outbox import Outbox
from shared.runtime.tracing import RecordTracer

from services.ingest.identity import IdentityDirectory
from services.ingest.normalize import normalize


class InboundConsumer:
    def __init__(self, reader: BatchReader, identities: IdentityDirectory, outbox: Outbox, tracing: RecordTracer) -> None:
        self.reader = reader
        self.identities = identities
        self.outbox = outbox
        self.tracing = tracing

    async def handle(self, records: Sequence[ConsumerRecord]) -> None:
        incoming = await self.reader.read(records)
        if incoming:
            messages: list[ChannelMessagePosted] = [i.payload for i in incoming]
            customers, created = await self.identities.resolve_batch(messages, incoming[-1].envelope.time)
            for item, customer_id in zip(incoming, customers, strict=True):
                # Only the first message of a customer created here says so: the ones after it
                # find the customer stored (or in memory) by then.
                new_customer = customer_id in created
                created.discard(customer_id)
                normalized = normalize(item.payload, customer_id, item.envelope.time, new_customer=new_customer)
                with self.tracing.span(item.record, item.envelope.id):
                    await self.outbox.send(
                        MESSAGES_RECEIVED.name,
                        customer_id,
                        normalized,
                        id=derived_id(item.envelope.id, "received"),
                        time=item.envelope.time,
                    )
        await self.outbox.flush()
        await self.reader.flush()
