"""A day in the life, end to end on the real broker and store: customers in two regions and
time zones write from all three channels; routing follows the operating model."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

from shared.contracts.agents import ReplyToCustomer, ResolveConversation, TransferConversation
from shared.contracts.customers import OptOutOfHomeTeam
from tests.e2e.conftest import DAY, NIGHT, System
from tests.support import eventually


def phone(area: str) -> str:
    return f"+1{area}555{uuid.uuid4().int % 10_000:04d}"


async def assigned(system: System, customer_id: str, count: int = 1) -> dict:
    return (await system.events(customer_id, "ConversationAssigned", count))[-1]["data"]


async def act(system: System, payload, customer_id: str) -> None:
    await system.probe.send("agent.actions.v1", customer_id, payload, time=getattr(payload, "sent_at", None) or DAY)


async def test_in_hours_sms_reaches_home_team_and_reply_goes_to_last_channel(system: System):
    number = phone("206")
    await system.customer_message(channel="sms", address=number, at=DAY, text="my internet is down")
    customer = await system.customer_id_of(number)
    first = await assigned(system, customer)
    assert (first["pool"], first["team_id"], first["pool_reason"]) == ("home_team", "pnw", "home_team")
    assert first["agent_id"] in {"sea-ana", "sea-ben"}

    # The same customer continues in the app (linked by the account's phone): same conversation.
    account = f"acct-{uuid.uuid4().hex[:8]}"
    await system.customer_message(
        channel="app", address=account, at=DAY + timedelta(minutes=1), text="now from the app", authenticated=True, linked_phone=number
    )
    added = await system.events(customer, "MessageAdded", count=2)
    assert {e["data"]["conversation_id"] for e in added} == {first["conversation_id"]}
    assert [e["data"]["channel"] for e in added] == ["sms", "app"]

    reply = ReplyToCustomer(
        action_id=f"a-{uuid.uuid4().hex}",
        customer_id=customer,
        conversation_id=first["conversation_id"],
        agent_id=first["agent_id"],
        text="we are on it",
        sent_at=DAY + timedelta(minutes=2),
    )
    await act(system, reply, customer)
    out = await system.probe.wait_for("messages.outbound.v1", lambda e: e["subject"] == customer)
    assert out[0]["data"]["channel"] == "app" and out[0]["data"]["address"] == account

    # Authentication carries over to the customer; the read API shows the transcript.
    view = await system.read_when(f"/customers/{customer}/conversation", lambda b: len(b.get("current", {}).get("transcript", [])) == 3)
    assert view["customer"]["authenticated"] is True
    assert [line["text"] for line in view["current"]["transcript"]] == ["my internet is down", "now from the app", "we are on it"]
    assert [line["direction"] for line in view["current"]["transcript"]] == ["inbound", "inbound", "outbound"]


async def test_returning_customer_goes_to_known_agent_and_history_is_kept(system: System):
    number = phone("206")
    await system.customer_message(channel="sms", address=number, at=DAY)
    customer = await system.customer_id_of(number)
    first = await assigned(system, customer)
    agent = first["agent_id"]
    await act(system, ReplyToCustomer(action_id=f"a-{uuid.uuid4().hex}", customer_id=customer, conversation_id=first["conversation_id"], agent_id=agent, text="fixed", sent_at=DAY + timedelta(minutes=3)), customer)
    await act(system, ResolveConversation(action_id=f"a-{uuid.uuid4().hex}", customer_id=customer, conversation_id=first["conversation_id"], agent_id=agent, resolved_at=DAY + timedelta(minutes=4)), customer)
    await system.events(customer, "ConversationResolved")

    # Two hours later (past the 30-minute reopen window): a new conversation, to the same agent.
    await system.customer_message(channel="sms", address=number, at=DAY + timedelta(hours=2), text="it broke again")
    second = await assigned(system, customer, count=2)
    assert second["conversation_id"] != first["conversation_id"]
    assert (second["agent_id"], second["reason"]) == (agent, "known_agent")

    view = await system.read_when(f"/customers/{customer}/conversation", lambda b: b["current"]["conversation_id"] == second["conversation_id"])
    assert [c["conversation_id"] for c in view["earlier"]] == [first["conversation_id"]]
    assert [line["text"] for line in view["earlier"][0]["transcript"]] == ["hello", "fixed"]
    assert (await system.state_http.get("/customers/cus_nobody/conversation")).status_code == 404
    assert (await system.state_http.get("/conversations/nope")).status_code == 404


async def test_business_chat_customer_of_another_region_reaches_that_team(system: System):
    source = f"urn:biz:{uuid.uuid4().hex}"
    await system.customer_message(channel="business_chat", address=source, at=DAY, business_id="biz-1", region={"market": "chicago"})
    customer = await system.customer_id_of(source)
    decision = await assigned(system, customer)
    assert (decision["team_id"], decision["agent_id"]) == ("chi", "chi-eve")


async def test_after_hours_message_goes_to_the_standard_pool(system: System):
    number = phone("206")
    await system.customer_message(channel="sms", address=number, at=NIGHT)
    customer = await system.customer_id_of(number)
    decision = await assigned(system, customer)
    assert (decision["pool"], decision["team_id"], decision["pool_reason"], decision["agent_id"]) == (
        "standard",
        "standard",
        "after_hours",
        "std-1",
    )


async def test_opted_out_customer_goes_to_the_standard_pool(system: System):
    number = phone("312")
    await system.customer_message(channel="sms", address=number, at=DAY)
    customer = await system.customer_id_of(number)
    first = await assigned(system, customer)
    assert first["team_id"] == "chi"
    await act(system, ResolveConversation(action_id=f"a-{uuid.uuid4().hex}", customer_id=customer, conversation_id=first["conversation_id"], agent_id=first["agent_id"], resolved_at=DAY + timedelta(minutes=1)), customer)
    await system.events(customer, "ConversationResolved")
    await system.probe.send("customers.commands.v1", customer, OptOutOfHomeTeam(command_id=f"c-{uuid.uuid4().hex}", customer_id=customer, requested_at=DAY + timedelta(minutes=2)))
    await system.events(customer, "CustomerPreferencesChanged")
    await system.customer_message(channel="sms", address=number, at=DAY + timedelta(hours=3))
    second = await assigned(system, customer, count=2)
    assert (second["pool"], second["pool_reason"], second["agent_id"]) == ("standard", "opt_out", "std-1")


async def test_busy_team_queues_and_assigns_when_an_agent_frees_up(system: System):
    # Team "tiny" has one agent with room for one conversation.
    customers = []
    for n in range(2):
        address = f"acct-{uuid.uuid4().hex[:8]}"
        await system.customer_message(channel="app", address=address, at=DAY + timedelta(seconds=n), authenticated=True, region={"zip": "99901"})
        customers.append(await system.customer_id_of(address))
    first = await assigned(system, customers[0])
    assert first["agent_id"] == "tiny-1"
    queued = (await system.events(customers[1], "ConversationQueued"))[0]["data"]
    assert (queued["team_id"], queued["queue_position"]) == ("tiny", 1)
    queue = await system.read_when("/teams/tiny/queue", lambda b: b["waiting"] and "tiny-1" in b["assigned"])
    assert [c["customer_id"] for c in queue["waiting"]] == [customers[1]]
    assert [c["customer_id"] for c in queue["assigned"]["tiny-1"]] == [customers[0]]

    await act(system, ResolveConversation(action_id=f"a-{uuid.uuid4().hex}", customer_id=customers[0], conversation_id=first["conversation_id"], agent_id="tiny-1", resolved_at=DAY + timedelta(minutes=5)), customers[0])
    later = await assigned(system, customers[1])
    assert later["agent_id"] == "tiny-1"
    assert (await system.state_http.get("/teams/unknown-team/queue")).status_code == 404


async def test_transfer_within_team_works_and_outside_team_is_refused(system: System):
    number = phone("206")
    await system.customer_message(channel="sms", address=number, at=DAY)
    customer = await system.customer_id_of(number)
    first = await assigned(system, customer)
    other_team_agent = "chi-eve"
    await act(system, TransferConversation(action_id=f"a-{uuid.uuid4().hex}", customer_id=customer, conversation_id=first["conversation_id"], agent_id=first["agent_id"], to_agent_id=other_team_agent, requested_at=DAY + timedelta(minutes=1)), customer)
    refused = (await system.events(customer, "ConversationTransferRefused"))[0]["data"]
    assert (refused["reason"], refused["to_agent_id"]) == ("outside_team", other_team_agent)

    teammate = "sea-ben" if first["agent_id"] == "sea-ana" else "sea-ana"
    await act(system, TransferConversation(action_id=f"a-{uuid.uuid4().hex}", customer_id=customer, conversation_id=first["conversation_id"], agent_id=first["agent_id"], to_agent_id=teammate, requested_at=DAY + timedelta(minutes=2)), customer)
    moved = await assigned(system, customer, count=2)
    assert (moved["agent_id"], moved["reason"], moved["team_id"]) == (teammate, "transfer", "pnw")


async def test_duplicate_provider_ids_are_processed_once(system: System):
    number = phone("206")
    provider_id = await system.customer_message(channel="sms", address=number, at=DAY, text="once")
    await system.customer_message(channel="sms", address=number, at=DAY + timedelta(seconds=5), text="once", provider_id=provider_id)
    await system.customer_message(channel="sms", address=number, at=DAY + timedelta(seconds=6), text="twice")
    customer = await system.customer_id_of(number)
    await system.events(customer, "MessageAdded", count=2)
    conversation = (await system.events(customer, "ConversationOpened"))[0]["data"]["conversation_id"]

    body = await system.read_when(f"/conversations/{conversation}", lambda b: b["transcript_total"] >= 2)
    assert [line["text"] for line in body["transcript"]] == ["once", "twice"]
    added = [e for e in await system.probe.envelopes("conversations.events.v1") if e["subject"] == customer and e["type"] == "hometeam.MessageAdded"]
    assert len({e["data"]["message_id"] for e in added}) == 2


async def test_poison_messages_are_dead_lettered_while_good_ones_flow(system: System):
    poison = [b"{not json", json.dumps({"specversion": "1.0", "id": "x", "type": "hometeam.Nope", "source": "/t", "time": DAY.isoformat(), "subject": "k", "data": {}}).encode()]
    for value in poison:
        await system.probe.send_raw(
            "channel.inbound.v1",
            value,
            key=b"poison",
            headers=[("x-adapter", b"sms-gw-7"), ("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")],
        )
    number = phone("206")
    await system.customer_message(channel="sms", address=number, at=DAY, text="still flowing")
    customer = await system.customer_id_of(number)
    await assigned(system, customer)

    records = []

    async def dead_letters() -> list | None:
        records[:] = await system.probe.records("channel.inbound.v1.dlq")
        return records if len(records) >= 2 else None

    await eventually(dead_letters, what="two dead letters")
    assert [r.value for r in records[:2]] == poison
    headers = dict((k, v.decode()) for k, v in records[0].headers)
    assert headers["x-hometeam-dlq-origin-topic"] == system.prefix + "channel.inbound.v1"
    assert headers["x-hometeam-dlq-error-type"] == "invalid_payload"
    assert headers["x-hometeam-dlq-origin-offset"].isdigit()
    assert headers["x-adapter"] == "sms-gw-7"
    assert headers["x-hometeam-dlq-origin-traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c")
    assert dict((k, v.decode()) for k, v in records[1].headers)["x-hometeam-dlq-error-type"] == "unknown_type"


async def test_a_burst_from_one_customer_yields_one_conversation_and_one_assignee(system: System):
    number = phone("206")
    for n in range(25):
        await system.customer_message(channel="sms", address=number, at=DAY + timedelta(milliseconds=3 * n), text=f"line {n}")
    customer = await system.customer_id_of(number)
    added = await system.events(customer, "MessageAdded", count=25)
    opened = [e for e in await system.probe.envelopes("conversations.events.v1") if e["subject"] == customer and e["type"] == "hometeam.ConversationOpened"]
    assigned_events = [e for e in await system.probe.envelopes("conversations.events.v1") if e["subject"] == customer and e["type"] == "hometeam.ConversationAssigned"]
    assert len({e["id"] for e in opened}) == 1
    assert len({e["data"]["agent_id"] for e in assigned_events}) == 1
    assert {e["data"]["conversation_id"] for e in added} == {opened[0]["data"]["conversation_id"]}
    # Per-customer order is kept: lines appear in the order they were sent.
    body = await system.read_when(f"/conversations/{opened[0]['data']['conversation_id']}?page_size=50", lambda b: b["transcript_total"] == 25)
    assert [line["text"] for line in body["transcript"]] == [f"line {n}" for n in range(25)]
    sequences = [e["sequence"] for e in await system.probe.envelopes("conversations.events.v1") if e["subject"] == customer]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
