"""Conversation-state's documents: ``customers``, ``conversations`` and ``messages``
(transcript lines, ``_id`` = message id, so a line is stored at most once)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReplaceOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from shared.runtime.store import bulk_write_chunked

from services.conversation_state.lifecycle import CustomerRecords
from services.conversation_state.model import Conversation, Customer, Line

DUPLICATE_KEY = 11000


class ConversationStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.customers = db["customers"]
        self.conversations = db["conversations"]
        self.messages = db["messages"]

    async def ensure_indexes(self) -> None:
        await self.conversations.create_index([("customer_id", ASCENDING), ("opened_at", DESCENDING)])
        await self.conversations.create_index([("team_id", ASCENDING), ("status", ASCENDING)])
        await self.messages.create_index([("conversation_id", ASCENDING), ("at", ASCENDING)])

    async def load(self, customer_ids: Iterable[str], conversation_ids: Iterable[str]) -> dict[str, CustomerRecords]:
        """The records of these customers, with their open and last conversations and any
        other conversation named in the batch."""
        ids = list(set(customer_ids))
        records = {cid: CustomerRecords(customer=None) for cid in ids}
        wanted = set(conversation_ids)
        async for doc in self.customers.find({"_id": {"$in": ids}}):
            customer = Customer.from_doc(doc)
            records[customer.id].customer = customer
            wanted.update(x for x in (customer.open_conversation_id, customer.last_conversation_id) if x)
        if wanted:
            async for doc in self.conversations.find({"_id": {"$in": list(wanted)}}):
                conv = Conversation.from_doc(doc)
                if conv.customer_id in records:
                    records[conv.customer_id].conversations[conv.id] = conv
        return records

    async def save(self, records: Iterable[CustomerRecords], lines: list[Line]) -> None:
        """Write lines first, then conversations, then customers (which carry the applied
        offsets): a crash in between replays the batch and every write repeats harmlessly."""
        if lines:
            try:
                await self.messages.insert_many([line.to_doc() for line in lines], ordered=False)
            except BulkWriteError as exc:
                if any(e.get("code") != DUPLICATE_KEY for e in exc.details.get("writeErrors", [])):
                    raise
        conv_ops: list[Any] = []
        customer_ops: list[Any] = []
        for r in records:
            if r.customer is None:
                continue
            customer_ops.append(ReplaceOne({"_id": r.customer.id}, r.customer.to_doc(), upsert=True))
            conv_ops.extend(ReplaceOne({"_id": c.id}, c.to_doc(), upsert=True) for c in r.conversations.values())
        if conv_ops:
            await bulk_write_chunked(self.conversations, conv_ops)
        if customer_ops:
            await bulk_write_chunked(self.customers, customer_ops)
