"""Every topic hometeam uses: its name, key, payload types, owner, dead-letter topic and size.

This table is the single source for topic creation (``scripts/stack.sh topics``), the
services' subscriptions and publications, and the contract tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from shared.contracts import agents, channel, conversations, customers, lifecycle, messages, pools, routing, surveys
from shared.contracts.envelope import type_name


@dataclass(frozen=True)
class Topic:
    name: str
    key: str
    payloads: tuple[type[BaseModel], ...]
    owner: str
    description: str
    partitions: int
    external: bool = False
    dead_letter: str | None = field(default=None)

    @property
    def type_names(self) -> tuple[str, ...]:
        return tuple(type_name(p) for p in self.payloads)


def _dlq(name: str) -> str:
    return f"{name}.dlq"


CHANNEL_INBOUND = Topic(
    name="channel.inbound.v1",
    key="address key: sha256 of '<channel>:<address>' (hex); never the raw address",
    payloads=(channel.ChannelMessagePosted,),
    owner="ingest",
    description="Customer messages from channel adapters and ingest's webhooks.",
    partitions=6,
    external=True,
    dead_letter=_dlq("channel.inbound.v1"),
)
MESSAGES_RECEIVED = Topic(
    name="messages.received.v1",
    key="customer id",
    payloads=(messages.CustomerMessageReceived,),
    owner="ingest",
    description="Normalized customer messages resolved to a customer.",
    partitions=6,
    dead_letter=_dlq("messages.received.v1"),
)
AGENT_ACTIONS = Topic(
    name="agent.actions.v1",
    key="customer id",
    payloads=(agents.ReplyToCustomer, agents.ResolveConversation, agents.TransferConversation),
    owner="conversation-state",
    description="Agent desktops' replies, resolves and transfers.",
    partitions=6,
    external=True,
    dead_letter=_dlq("agent.actions.v1"),
)
AGENT_PRESENCE = Topic(
    name="agent.presence.v1",
    key="agent id",
    payloads=(agents.AgentPresenceChanged,),
    owner="team-routing",
    description="Agents signing in, stepping away and signing out.",
    partitions=3,
    external=True,
    dead_letter=_dlq("agent.presence.v1"),
)
CUSTOMER_COMMANDS = Topic(
    name="customers.commands.v1",
    key="customer id",
    payloads=(
        customers.OptOutOfHomeTeam,
        customers.OptInToHomeTeam,
        customers.ReassignHomeTeam,
        customers.ScheduleCallback,
    ),
    owner="conversation-state",
    description="Opt-out, opt-in, explicit home-team reassignment and callback requests.",
    partitions=6,
    external=True,
    dead_letter=_dlq("customers.commands.v1"),
)
ROUTING_COMMANDS = Topic(
    name="routing.commands.v1",
    key="pool id: a team id, or 'standard'",
    payloads=(
        routing.RouteConversation,
        routing.ReleaseConversation,
        routing.ChangeConversationWeight,
        routing.MoveToTeammate,
        routing.SetAgentPresence,
        routing.OfferToTeammate,
        routing.MoveWaitingToStandard,
        routing.ReturnWaitingHome,
    ),
    owner="team-routing",
    description="Everything that changes a pool's agents, loads or queue.",
    partitions=3,
    dead_letter=_dlq("routing.commands.v1"),
)
ROUTING_DECISIONS = Topic(
    name="routing.decisions.v1",
    key="customer id",
    payloads=(routing.ConversationRouted, routing.TransferRefused),
    owner="team-routing",
    description="Routing decisions with pool, team, agent and reason.",
    partitions=6,
    dead_letter=_dlq("routing.decisions.v1"),
)
CONVERSATION_EVENTS = Topic(
    name="conversations.events.v1",
    key="customer id",
    payloads=(
        conversations.ConversationOpened,
        conversations.MessageAdded,
        conversations.ConversationAssigned,
        conversations.ConversationQueued,
        conversations.ConversationStatusChanged,
        conversations.ConversationTransferRefused,
        conversations.ConversationResolved,
        conversations.ConversationClosed,
        conversations.CustomerPreferencesChanged,
        conversations.CommandRejected,
        conversations.CallbackScheduled,
    ),
    owner="conversation-state",
    description="Conversation lifecycle for integrators and the other services.",
    partitions=6,
    external=True,
    dead_letter=_dlq("conversations.events.v1"),
)
MESSAGES_OUTBOUND = Topic(
    name="messages.outbound.v1",
    key="customer id",
    payloads=(messages.DeliverMessage,),
    owner="conversation-state",
    description="Agent replies for channel adapters to deliver on the customer's last channel.",
    partitions=6,
    external=True,
)

LIFECYCLE_COMMANDS = Topic(
    name="lifecycle.commands.v1",
    key="customer id",
    payloads=(lifecycle.CloseInactiveConversation, lifecycle.StartCallback),
    owner="conversation-state",
    description="Deadlines fallen due (inactivity, callbacks), from the timeout sweeper.",
    partitions=6,
    dead_letter=_dlq("lifecycle.commands.v1"),
)
POOL_STATUS = Topic(
    name="pools.status.v1",
    key="pool id: a team id, or 'standard'",
    payloads=(pools.PoolStatusChanged,),
    owner="team-routing",
    description="A pool's queue depth, oldest wait, staffing, load and surge state.",
    partitions=3,
    external=True,
    dead_letter=_dlq("pools.status.v1"),
)
SURVEY_RESPONSES = Topic(
    name="surveys.responses.v1",
    key="customer id",
    payloads=(surveys.SurveyAnswered,),
    owner="metrics",
    description="Customer satisfaction answers (CSAT), from the survey tool.",
    partitions=6,
    external=True,
    dead_letter=_dlq("surveys.responses.v1"),
)

TOPICS: tuple[Topic, ...] = (
    CHANNEL_INBOUND,
    MESSAGES_RECEIVED,
    AGENT_ACTIONS,
    AGENT_PRESENCE,
    CUSTOMER_COMMANDS,
    ROUTING_COMMANDS,
    ROUTING_DECISIONS,
    CONVERSATION_EVENTS,
    MESSAGES_OUTBOUND,
    LIFECYCLE_COMMANDS,
    POOL_STATUS,
    SURVEY_RESPONSES,
)

DEAD_LETTER_PARTITIONS = 1


def all_topic_partitions() -> dict[str, int]:
    """Every topic to create, dead-letter topics included, with its partition count."""
    out: dict[str, int] = {}
    for topic in TOPICS:
        out[topic.name] = topic.partitions
        if topic.dead_letter:
            out[topic.dead_letter] = DEAD_LETTER_PARTITIONS
    return out


MESSAGE_TYPES: dict[str, type[BaseModel]] = {
    type_name(payload): payload for topic in TOPICS for payload in topic.payloads
}


def topic_by_name(name: str) -> Topic:
    for topic in TOPICS:
        if topic.name == name:
            return topic
    raise KeyError(name)


if __name__ == "__main__":  # used by scripts/stack.sh to create topics
    for name, partitions in all_topic_partitions().items():
        print(name, partitions)
