"""Identity: (channel, address) → customer. A new address creates a customer; the app's
authenticated identity links the account's phone so SMS and app reach one customer.

Identities are documents ``{_id: "<channel>:<address>", customer_id}`` whose unique ``_id``
settles races between replicas: whoever inserts first wins and the other reads it back.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from shared.contracts.channel import ChannelMessagePosted
from shared.contracts.common import Channel
from shared.runtime.store import DUPLICATE_KEY, find_by_ids, insert_absent

def identity_key(channel: Channel | str, address: str) -> str:
    return f"{Channel(channel).value}:{address}"


def new_customer_id() -> str:
    return "cus_" + uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Link:
    """Identities a message names: its own, and for the app the account's phone to link."""

    own: str
    linked: str | None = None


def links_of(msg: ChannelMessagePosted) -> Link:
    own = identity_key(msg.channel, msg.address)
    linked = identity_key(Channel.SMS, msg.linked_phone) if msg.linked_phone else None
    return Link(own, linked)


def resolve_links(known: dict[str, str], links: Iterable[Link], new_id=new_customer_id) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Pure: given the identities already known, the new identities these messages create
    (identity key → customer id). A message's own identity wins over its linked one; two
    existing identities of different customers are never merged."""
    created: dict[str, str] = {}
    view = dict(known)
    for link in links:
        own = view.get(link.own)
        linked = view.get(link.linked) if link.linked else None
        customer = own or linked or new_id()
        for key in (link.own, link.linked):
            if key and key not in view:
                view[key] = created[key] = customer
    return created


class IdentityDirectory:
    def __init__(self, db: AsyncDatabase, cache_size: int = 200_000) -> None:
        self.identities = db["identities"]
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._cache_size = cache_size

    def _remember(self, key: str, customer_id: str) -> None:
        self._cache[key] = customer_id
        self._cache.move_to_end(key)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _lookup(self, keys: set[str]) -> dict[str, str]:
        found = {k: self._cache[k] for k in keys if k in self._cache}
        missing = [k for k in keys if k not in found]
        if missing:
            for key, doc in (await find_by_ids(self.identities, missing)).items():
                found[key] = doc["customer_id"]
                self._remember(key, doc["customer_id"])
        return found

    async def _create_unlinked(self, links: list[Link], now: datetime) -> set[str]:
        """Insert-first for messages that name only their own identity: creating an identity
        that turns out to exist costs a duplicate-key answer, while reading one that does not
        exist costs a point read (on FerretDB a point read costs about ten inserts). Created
        identities go to the cache; those that existed are read by the caller as usual.
        Identities a linking message names are left alone (their customer depends on both)."""
        in_links = {k for link in links if link.linked for k in (link.own, link.linked)}
        fresh = {link.own for link in links if link.linked is None and link.own not in self._cache and link.own not in in_links}
        if not fresh:
            return set()
        docs = [{"_id": k, "customer_id": new_customer_id(), "created_at": now} for k in sorted(fresh)]
        existed = await insert_absent(self.identities, docs)
        for doc in docs:
            if doc["_id"] not in existed:
                self._remember(doc["_id"], doc["customer_id"])
        return {doc["customer_id"] for doc in docs if doc["_id"] not in existed}

    async def resolve(self, messages: list[ChannelMessagePosted], now: datetime) -> list[str]:
        """The customer id of each message, creating identities for new addresses."""
        return (await self.resolve_batch(messages, now))[0]

    async def resolve_batch(self, messages: list[ChannelMessagePosted], now: datetime) -> tuple[list[str], set[str]]:
        """The customer id of each message, creating identities for new addresses; and the
        customers created by this call (their ids were minted here)."""
        links = [links_of(m) for m in messages]
        keys = {k for link in links for k in (link.own, link.linked) if k}
        minted = await self._create_unlinked(links, now)
        known = await self._lookup(keys)
        created = resolve_links(known, links)
        if created:
            docs = [{"_id": k, "customer_id": c, "created_at": now} for k, c in created.items()]
            try:
                await self.identities.insert_many(docs, ordered=False)
            except BulkWriteError as exc:
                if any(e.get("code") != DUPLICATE_KEY for e in exc.details.get("writeErrors", [])):
                    raise
                # Another replica created some of them first: theirs stand; resolve again.
                known = await self._lookup(keys - set(created)) | {
                    key: d["customer_id"] for key, d in (await find_by_ids(self.identities, created)).items()
                }
                created = resolve_links(known, links)
                if created:  # pragma: no cover - only if a conflicting insert vanished
                    raise RuntimeError("identity insert race did not settle")
            existing_customers = set(known.values())
            for key, customer in created.items():
                self._remember(key, customer)
                if customer not in existing_customers:
                    minted.add(customer)
            known |= created
        return [known[link.own] for link in links], minted
