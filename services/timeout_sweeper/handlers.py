"""The sweeper's consumer of ``conversations.events.v1``: turns lifecycle events into armed
and cancelled deadlines (one batch, one net change per deadline)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from aiokafka import ConsumerRecord

from shared.contracts.conversations import ConversationOpened
from shared.runtime.decoding import BatchReader
from shared.runtime.owned_cache import OwnedStateCache
from shared.teams import DirectoryWatcher

from services.timeout_sweeper.deadlines import INACTIVITY, RESPONSE, Arm, Change, changes_for, collapse
from services.timeout_sweeper.store import NO_HEAD, DeadlineStore, Head

CONVERSATION_KINDS = (INACTIVITY, RESPONSE)  # the deadlines armed per conversation


class DeadlineTracker:
    def __init__(
        self,
        reader: BatchReader,
        store: DeadlineStore,
        directory: DirectoryWatcher,
        clock: Callable[[], datetime],
        heads: OwnedStateCache[Head] | None = None,
    ) -> None:
        # Heads are written only by this consumer (events are keyed by customer), so what it
        # last wrote stays true while it owns the partition: kept between batches, "" = none.
        self.heads = heads if heads is not None else OwnedStateCache[str](0)
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
        epoch = self.heads.epoch
        known = self.heads.take(f"{kind}:{entity}" for kind, entity in net)
        # A conversation opened in this batch has no deadlines yet: nothing to read. (On a
        # replay its earlier armings are superseded when the later events replay.)
        opened = {i.payload.conversation_id for i in incoming if isinstance(i.payload, ConversationOpened)}
        for conversation_id in opened:
            for kind in CONVERSATION_KINDS:
                known.setdefault(f"{kind}:{conversation_id}", NO_HEAD)
        # "Only if absent" arms (the response clock of a customer's follow-up message) must not
        # restart a clock armed in an earlier batch.
        conditional = [k for k, c in net.items() if isinstance(c, Arm) and c.only_if_absent]
        now = self.clock()
        if conditional:
            running = await self.store.existing(RESPONSE, [entity for _, entity in conditional], now, known)
            for key in conditional:
                if key[1] in running:
                    del net[key]
        if net:
            known |= await self.store.apply(net, now, known)
        await self.reader.flush()
        self.heads.put_back(known, epoch)

