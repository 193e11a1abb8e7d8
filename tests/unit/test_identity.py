"""Identity: (channel, address) → customer, and the ids and keys ingest derives from a message."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from services.ingest.identity import Link, identity_key, links_of, resolve_links
from services.ingest.normalize import address_key, message_id, normalize
from shared.contracts.channel import ChannelMessagePosted
from shared.contracts.common import Channel

NOW = datetime(2026, 3, 2, 17, 0, tzinfo=UTC)
PHONE = "+12065550100"
OTHER_PHONE = "+13125550199"
SMS = identity_key(Channel.SMS, PHONE)
OTHER_SMS = identity_key(Channel.SMS, OTHER_PHONE)
APP = identity_key(Channel.APP, "acct-42")
CHAT = identity_key(Channel.BUSINESS_CHAT, "urn:chat:src-9f8e")


def counter() -> Callable[[], str]:
    """Predictable new customer ids: cus_new1, cus_new2, ..."""
    n = 0

    def new_id() -> str:
        nonlocal n
        n += 1
        return f"cus_new{n}"

    return new_id


@pytest.mark.parametrize(
    ("known", "links", "created"),
    [
        pytest.param({}, [Link(SMS)], {SMS: "cus_new1"}, id="new address: new customer"),
        pytest.param({SMS: "cus_a"}, [Link(SMS)], {}, id="known address: its customer, nothing created"),
        pytest.param(
            {SMS: "cus_a"}, [Link(APP, linked=SMS)], {APP: "cus_a"}, id="app joins the customer of its linked phone"
        ),
        pytest.param(
            {APP: "cus_b"}, [Link(APP, linked=SMS)], {SMS: "cus_b"}, id="new phone joins the app's customer"
        ),
        pytest.param(
            {APP: "cus_b", SMS: "cus_a"}, [Link(APP, linked=SMS)], {}, id="both known to different customers: no merge"
        ),
        pytest.param(
            {APP: "cus_b", SMS: "cus_b"}, [Link(APP, linked=SMS)], {}, id="both known to the same customer"
        ),
        pytest.param(
            {}, [Link(APP, linked=SMS)], {APP: "cus_new1", SMS: "cus_new1"}, id="both new: one customer for both"
        ),
        pytest.param(
            {}, [Link(SMS), Link(SMS), Link(SMS)], {SMS: "cus_new1"}, id="same new address thrice in a batch"
        ),
        pytest.param(
            {}, [Link(SMS), Link(CHAT), Link(SMS)], {SMS: "cus_new1", CHAT: "cus_new2"}, id="two new addresses"
        ),
        pytest.param(
            {},
            [Link(SMS), Link(APP, linked=SMS)],
            {SMS: "cus_new1", APP: "cus_new1"},
            id="phone new earlier in the batch: the app joins it",
        ),
        pytest.param(
            {},
            [Link(APP, linked=SMS), Link(SMS)],
            {SMS: "cus_new1", APP: "cus_new1"},
            id="app new earlier in the batch: the SMS joins it",
        ),
        pytest.param(
            {SMS: "cus_a"},
            [Link(APP, linked=SMS), Link(APP, linked=OTHER_SMS)],
            {APP: "cus_a", OTHER_SMS: "cus_a"},
            id="the app's own identity wins over a second linked phone",
        ),
    ],
)
def test_resolve_links(known, links, created):
    known_before = dict(known)

    assert resolve_links(known, links, new_id=counter()) == created
    assert known == known_before  # the caller's view is not modified


def test_resolve_links_never_mints_an_id_it_does_not_use():
    minted: list[str] = []

    def new_id() -> str:
        minted.append(f"cus_{len(minted)}")
        return minted[-1]

    resolve_links({SMS: "cus_a", APP: "cus_b"}, [Link(SMS), Link(APP, linked=SMS), Link(APP)], new_id=new_id)

    assert minted == []


def _posted(channel: Channel, address: str, **extra: object) -> ChannelMessagePosted:
    return ChannelMessagePosted(
        channel=channel, provider_message_id="SM123", address=address, text="hello", sent_at=NOW, **extra
    )


@pytest.mark.parametrize(
    ("msg", "link"),
    [
        (_posted(Channel.SMS, PHONE), Link(SMS)),
        (_posted(Channel.BUSINESS_CHAT, "urn:chat:src-9f8e"), Link(CHAT)),
        (_posted(Channel.APP, "acct-42", authenticated=True), Link(APP)),
        (_posted(Channel.APP, "acct-42", authenticated=True, linked_phone=PHONE), Link(APP, linked=SMS)),
    ],
)
def test_links_of_names_the_message_identity_and_the_phone_it_links(msg, link):
    assert links_of(msg) == link


# --- message ids and record keys ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ((Channel.SMS, "SM1", None), (Channel.SMS, "SM1", None), True),
        ((Channel.SMS, "SM1", "tel-1800"), (Channel.SMS, "SM1", "tel-1800"), True),
        ((Channel.SMS, "SM1", None), (Channel.APP, "SM1", None), False),
        ((Channel.SMS, "SM1", None), (Channel.BUSINESS_CHAT, "SM1", None), False),
        ((Channel.BUSINESS_CHAT, "m-1", None), (Channel.APP, "m-1", None), False),
        ((Channel.SMS, "SM1", None), (Channel.SMS, "SM2", None), False),
        # Two businesses on one chat provider may reuse message ids.
        ((Channel.BUSINESS_CHAT, "m-1", "biz-a"), (Channel.BUSINESS_CHAT, "m-1", "biz-b"), False),
    ],
)
def test_message_id_is_stable_per_channel_and_provider_id(a, b, same):
    assert (message_id(*a) == message_id(*b)) is same


def test_normalize_carries_the_stable_message_id_and_the_message():
    msg = _posted(Channel.SMS, PHONE, business_id="tel-18005550199", region={"zip": "98101"})

    first = normalize(msg, "cus_a", received_at=NOW)
    retry = normalize(msg, "cus_a", received_at=datetime(2026, 3, 2, 17, 5, tzinfo=UTC))

    assert first.message_id == retry.message_id == message_id(Channel.SMS, "SM123", "tel-18005550199")
    assert (first.customer_id, first.address, first.text, first.region.zip, first.received_at) == (
        "cus_a",
        PHONE,
        "hello",
        "98101",
        NOW,
    )


@pytest.mark.parametrize(
    ("channel", "address"),
    [
        (Channel.SMS, "+12065550100"),
        (Channel.SMS, "+442071838750"),
        (Channel.BUSINESS_CHAT, "urn:chat:src-9f8e"),
        (Channel.APP, "acct-42"),
    ],
)
def test_address_key_is_stable_and_never_contains_the_address(channel, address):
    key = address_key(channel, address)
    digits = "".join(ch for ch in address if ch.isdigit())

    assert key == address_key(channel, address)
    assert re.fullmatch(r"[0-9a-f]{32}", key)  # an opaque digest, whatever the address
    assert address not in key
    if len(digits) >= 7:
        assert digits[-7:] not in key  # not even the subscriber number
    assert key != address_key(channel, address + "1")
    assert all(key != address_key(other, address) for other in Channel if other is not channel)


async def test_only_the_first_message_of_a_customer_created_in_the_batch_is_flagged_new() -> None:
    """Ingest's handler marks ``new_customer`` on the message that created the customer only:
    a later message of the same batch may reach conversation-state in a later batch, when the
    customer is stored, and must be looked up."""
    from datetime import UTC, datetime

    from aiokafka import ConsumerRecord

    from services.ingest.handlers import InboundConsumer
    from shared.contracts.channel import ChannelMessagePosted
    from shared.runtime.decoding import Incoming

    now = datetime(2026, 11, 23, 12, tzinfo=UTC)
    posted = [
        ChannelMessagePosted(channel="sms", provider_message_id=f"SM{n}", address=a, text="hi", sent_at=now)
        for n, a in enumerate(["+12065550001", "+12065550001", "+12065550002"])
    ]

    class Reader:
        async def read(self, records):  # type: ignore[no-untyped-def]
            return [
                Incoming(record=ConsumerRecord("t", 0, n, 0, 0, None, b"", None, 0, 0, []), envelope=type("E", (), {"id": f"e{n}", "time": now})(), payload=p)
                for n, p in enumerate(posted)
            ]

        async def flush(self) -> None:
            pass

    class Identities:
        async def resolve_batch(self, messages, at):  # type: ignore[no-untyped-def]
            return ["cus_a", "cus_a", "cus_b"], {"cus_a"}

    sent: list[tuple[str, bool]] = []

    class Outbox:
        async def send(self, topic, key, payload, **kwargs):  # type: ignore[no-untyped-def]
            sent.append((payload.customer_id, payload.new_customer))

        async def flush(self) -> None:
            pass

    class Tracing:
        def span(self, record, envelope_id):  # type: ignore[no-untyped-def]
            import contextlib

            return contextlib.nullcontext()

    await InboundConsumer(Reader(), Identities(), Outbox(), Tracing()).handle([])  # type: ignore[arg-type]
    assert sent == [("cus_a", True), ("cus_a", False), ("cus_b", False)]
