"""One customer message yields one trace across ingest → conversation-state → team-routing →
conversation-state → the lifecycle events, with W3C trace context in Kafka headers; span
attributes follow the messaging conventions and carry no personal data."""

from __future__ import annotations

import uuid
from contextlib import AsyncExitStack
from datetime import UTC, datetime

import yaml
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from twilio.request_validator import RequestValidator

from services.conversation_state.app import ConversationStateSettings
from services.conversation_state.app import create_service as conversation_state
from services.ingest.app import IngestSettings
from services.ingest.app import create_service as ingest
from services.team_routing.app import TeamRoutingSettings
from services.team_routing.app import create_service as team_routing
from shared.contracts.agents import AgentPresenceChanged, Presence, ReplyToCustomer
from tests.e2e.conftest import TEAMS
from tests.support import KafkaProbe, eventually, running, service_settings

TOKEN = "trace-test-token"
PHONE = "+12065550188"
TEXT = "my router blinks red since noon"


async def test_one_inbound_message_is_one_trace_across_the_services(infra, topic_prefix, mongo_db_name, tmp_path):
    exporter = InMemorySpanExporter()
    spans = [SimpleSpanProcessor(exporter)]
    config = tmp_path / "teams.yaml"
    config.write_text(yaml.safe_dump(TEAMS))
    async with AsyncExitStack() as stack:
        probe = await stack.enter_async_context(KafkaProbe(infra.kafka, topic_prefix))
        ingest_http = await stack.enter_async_context(
            running(ingest(service_settings(IngestSettings, infra, topic_prefix, mongo_db_name, twilio_auth_token=TOKEN), span_processors=spans))
        )
        await stack.enter_async_context(
            running(team_routing(service_settings(TeamRoutingSettings, infra, topic_prefix, mongo_db_name, teams_config=config), span_processors=spans))
        )
        await stack.enter_async_context(
            running(conversation_state(service_settings(ConversationStateSettings, infra, topic_prefix, mongo_db_name, teams_config=config), span_processors=spans))
        )
        now = datetime.now(UTC)
        # The message goes out at wall-clock time: Seattle may be open or closed, so the
        # standard pool is staffed too and the conversation is assigned either way.
        for agent in ("sea-ana", "sea-ben", "std-1"):
            await probe.send("agent.presence.v1", agent, AgentPresenceChanged(agent_id=agent, presence=Presence.ONLINE, changed_at=now))

        url = "http://hometeam.test/webhooks/sms"
        params = {"From": PHONE, "To": "+18005550100", "Body": TEXT, "MessageSid": f"SM{uuid.uuid4().hex}", "NumMedia": "0"}
        signature = RequestValidator(TOKEN).compute_signature(url, params)
        answer = await ingest_http.post("/webhooks/sms", data=params, headers={"X-Twilio-Signature": signature})
        assert answer.status_code == 200

        received = await probe.wait_for("messages.received.v1", lambda e: e["data"]["address"] == PHONE)
        customer = received[0]["data"]["customer_id"]
        assigned = await probe.wait_for(
            "conversations.events.v1", lambda e: e["subject"] == customer and e["type"] == "hometeam.ConversationAssigned", timeout_s=60
        )

        def trace_of_webhook() -> int | None:
            roots = [s for s in exporter.get_finished_spans() if s.name == "POST /webhooks/sms"]
            return roots[0].context.trace_id if roots else None

        trace_id = await eventually(lambda: _async(trace_of_webhook()), what="webhook span")

        def spans_of_trace() -> list | None:
            found = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
            names = {s.name for s in found}
            wanted = {
                f"process {topic_prefix}channel.inbound.v1",
                f"process {topic_prefix}messages.received.v1",
                f"process {topic_prefix}routing.commands.v1",
                f"process {topic_prefix}routing.decisions.v1",
                f"send {topic_prefix}conversations.events.v1",
            }
            return found if wanted <= names else None

        in_trace = await eventually(lambda: _async(spans_of_trace()), timeout_s=30, what="the whole path in one trace")
        services = {s.resource.attributes["service.name"] for s in in_trace}
        assert services == {"ingest", "team-routing", "conversation-state"}
        # Every hop is a child of the one before (one trace, parents inside it).
        ids = {s.context.span_id for s in in_trace}
        assert all(s.parent is None or s.parent.span_id in ids for s in in_trace)
        process = [s for s in in_trace if s.name.startswith("process ")]
        assert all(s.attributes["messaging.system"] == "kafka" for s in process)

        # An agent's reply continues the trace of the agent's action to messages.outbound.
        data = assigned[0]["data"]
        await probe.send(
            "agent.actions.v1",
            customer,
            ReplyToCustomer(action_id=f"a-{uuid.uuid4().hex}", customer_id=customer, conversation_id=data["conversation_id"], agent_id=data["agent_id"], text="on it", sent_at=datetime.now(UTC)),
        )
        out = await probe.wait_for("messages.outbound.v1", lambda e: e["subject"] == customer)
        headers = dict(next(r for r in await probe.records("messages.outbound.v1") if r.key == customer.encode()).headers)
        outbound_trace = int(headers["traceparent"].decode().split("-")[1], 16)
        assert any(s.name == f"process {topic_prefix}agent.actions.v1" and s.context.trace_id == outbound_trace for s in exporter.get_finished_spans())
        assert out[0]["data"]["text"] == "on it"

    # No personal data in any span attribute, resource or name.
    for span in exporter.get_finished_spans():
        blob = repr((span.name, dict(span.attributes or {}), [dict(e.attributes or {}) for e in span.events]))
        assert PHONE not in blob and PHONE.lstrip("+") not in blob and TEXT not in blob, span.name
        assert "messaging.kafka.message.key" not in (span.attributes or {})


async def _async(value):
    return value
