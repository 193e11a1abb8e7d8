"""The outbox's records made before they are sent (what conversation-state journals), and a
failed batch's queued records forgotten so the next batch's ``flush`` sends only its own."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from shared.contracts.customers import OptOutOfHomeTeam
from shared.runtime.outbox import Outbox, OutputRecord

AT = datetime(2026, 3, 2, 17, tzinfo=UTC)


class Publisher:
    """Records what is sent, one batch per ``send_batches``; a batch's acknowledgement fails
    if ``failing``."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]] = []
        self.batches: list[list[bytes]] = []
        self.failing = False

    def traced(self, topic: str, headers: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        return headers

    async def send_batches(self, records: list[tuple[str, bytes, bytes, list[tuple[str, bytes]]]]) -> list[asyncio.Future[Any]]:
        self.sent.extend(records)
        self.batches.append([value for _, value, _, _ in records])
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.failing:
            future.set_exception(ConnectionError("not acknowledged"))
        else:
            future.set_result(None)
        return [future]


async def test_a_record_made_kept_and_sent_later_is_what_send_would_have_sent() -> None:
    publisher = Publisher()
    outbox = Outbox(publisher, "/src", "p.")  # type: ignore[arg-type]
    payload = OptOutOfHomeTeam(command_id="cmd-1", customer_id="cus_1", requested_at=AT)
    await outbox.send("customers.commands.v1", "cus_1", payload, id="e1", time=AT, sequence=4)
    made = outbox.record("customers.commands.v1", "cus_1", payload, id="e1", time=AT, sequence=4)
    await outbox.send_record(OutputRecord.from_list(made.to_list()))  # (as a journal keeps it)
    await outbox.flush()
    assert publisher.sent[0] == publisher.sent[1]
    assert publisher.sent[0][0] == "p.customers.commands.v1" and publisher.sent[0][2] == b"cus_1"
    assert json.loads(publisher.sent[0][1])["sequence"] == 4


@pytest.mark.parametrize("abandoned", [True, False])
async def test_a_failed_batch_abandons_its_queued_records_and_the_next_flush_sends_only_its_own(abandoned) -> None:
    publisher = Publisher()
    outbox = Outbox(publisher, "/src")  # type: ignore[arg-type]
    payload = OptOutOfHomeTeam(command_id="cmd-1", customer_id="cus_1", requested_at=AT)
    await outbox.send("t", "cus_1", payload, id="e1", time=AT)  # (its batch then fails before its flush)
    if abandoned:
        outbox.abandon()
    await outbox.send("t", "cus_1", payload, id="e2", time=AT)
    await outbox.flush()
    ids = [json.loads(value)["id"] for value in publisher.batches[0]]
    assert ids == (["e2"] if abandoned else ["e1", "e2"])
