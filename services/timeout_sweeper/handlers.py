"""The sweeper's consumer of ``conversations.events.v1``: turns lifecycle events into armed
and cancelled deadlines (one batch, one net change per deadline)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from aiokafka import ConsumerRecord

from shared.runtime.decoding import BatchReader
from shared.teams import DirectoryWatcher

from services.timeout_sweeper.deadlines import RESPONSE, Arm, Change, changes_for, collapse
from services.timeout_sweeper.store import DeadlineStore


class DeadlineTracker:
    def __init__(self, reader: BatchReader, store: DeadlineStore, directory: DirectoryWatcher, clock: Callable[[], datetime]) -> None:
        self.reader = reader
        self.store = store
        self.directory = directory
        self.clock = clock

    async def handle(self, records: Sequence[ConsumerRecord]) -> None:
        incoming = await self.reader.read(records)
        directory = self.directory.current
        changes: list[Change] = []
        for item in incoming:
            changes.extend(changes_for(item.payload, item.envelope.sequence or item.offset, directory))
        net = collapse(changes)
        # "Only if absent" arms (the response clock of a customer's follow-up message) must not
        # restart a clock armed in an earlier batch.
        conditional = [k for k, c in net.items() if isinstance(c, Arm) and c.only_if_absent]
        if conditional:
            running = await self.store.existing(RESPONSE, [entity for _, entity in conditional])
            for key in conditional:
                if key[1] in running:
                    del net[key]
        if net:
            await self.store.apply(net, self.clock())
        await self.reader.flush()

