"""Publishing a batch's outputs: envelopes built in one place, sent without waiting on each,
then awaited together before the batch's offsets are committed."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from faststream.kafka import KafkaBroker
from pydantic import BaseModel

from shared.contracts.envelope import new_envelope


class Outbox:
    def __init__(self, broker: KafkaBroker, source: str, topic_prefix: str = "") -> None:
        self._broker = broker
        self._source = source
        self._prefix = topic_prefix
        self._pending: list[asyncio.Future[Any]] = []

    async def send(
        self,
        topic: str,
        key: str,
        payload: BaseModel,
        *,
        id: str,
        time: datetime,
        sequence: int | None = None,
    ) -> None:
        """Queue one record for Kafka (the producer batches); ``flush`` waits for it."""
        envelope = new_envelope(payload, subject=key, source=self._source, time=time, id=id, sequence=sequence)
        future = await self._broker.publish(
            envelope.model_dump_json().encode(),
            topic=self._prefix + topic,
            key=key.encode(),
            headers={"content-type": "application/cloudevents+json", "ce-type": envelope.type},
            no_confirm=True,
        )
        if future is not None:
            self._pending.append(future)

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)
