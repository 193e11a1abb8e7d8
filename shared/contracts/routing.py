"""``routing.commands.v1`` (keyed by pool) and ``routing.decisions.v1`` (keyed by customer).

Team-routing is the single writer of a pool's state (agents, loads, queue): everything that
changes it travels on ``routing.commands.v1`` keyed by the pool id (a team id, or
``standard`` for the standard pool), so one consumer owns one pool at a time.
"""

from __future__ import annotations

from pydantic import AwareDatetime, Field

from shared.contracts.agents import Presence
from shared.contracts.common import (
    Channel,
    Identifier,
    PoolKind,
    Priority,
    RoutingReason,
    WaitingOn,
)
from shared.contracts.envelope import InboundModel

STANDARD_POOL_ID = "standard"


class RouteConversation(InboundModel):
    """Find a place for a conversation that has no agent (new, reopened, or its agent left)."""

    request_id: Identifier
    conversation_id: Identifier
    customer_id: Identifier
    home_team_id: Identifier
    opted_out: bool = False
    channel: Channel
    current_agent_id: Identifier | None = None
    known_agent_id: Identifier | None = Field(
        default=None, description="The agent who last served this customer"
    )
    known_agent_served_at: AwareDatetime | None = None
    waiting_on: WaitingOn = WaitingOn.AGENT
    priority: Priority = 0
    forced_pool: PoolKind | None = Field(
        default=None, description="Set when a decision already chose the pool (overflow hop)"
    )
    forced_reason: RoutingReason | None = None
    requested_at: AwareDatetime


class ReleaseConversation(InboundModel):
    """The conversation ended (resolved or closed inactive): free the agent's room."""

    request_id: Identifier
    conversation_id: Identifier
    customer_id: Identifier
    released_at: AwareDatetime


class ChangeConversationWeight(InboundModel):
    """Who the conversation waits on changed; a conversation waiting on the customer weighs less."""

    request_id: Identifier
    conversation_id: Identifier
    customer_id: Identifier
    waiting_on: WaitingOn
    changed_at: AwareDatetime


class MoveToTeammate(InboundModel):
    """An agent transfer request, forwarded to the pool that owns the conversation."""

    request_id: Identifier
    conversation_id: Identifier
    customer_id: Identifier
    from_agent_id: Identifier
    to_agent_id: Identifier
    requested_at: AwareDatetime


class SetAgentPresence(InboundModel):
    """An agent's presence, forwarded from ``agent.presence.v1`` to the agent's pool."""

    request_id: Identifier
    agent_id: Identifier
    presence: Presence
    changed_at: AwareDatetime


class OfferToTeammate(InboundModel):
    """The assigned agent missed the team's response target: offer the conversation to another
    online teammate with room (never outside the pool); it stays put if nobody has room."""

    request_id: Identifier
    conversation_id: Identifier
    customer_id: Identifier
    agent_id: Identifier = Field(description="The agent who missed the target")
    due_at: AwareDatetime


class MoveWaitingToStandard(InboundModel):
    """The team closed: its waiting (unassigned) conversations move to the standard pool.
    Keyed by the team's id."""

    request_id: Identifier
    team_id: Identifier
    at: AwareDatetime


class ReturnWaitingHome(InboundModel):
    """The team opened (or its surge cleared): its customers' conversations still waiting in
    the standard pool go back home. Keyed by 'standard'."""

    request_id: Identifier
    team_id: Identifier
    at: AwareDatetime


class ConversationRouted(InboundModel):
    """A routing decision: where the conversation goes and why (one per decision)."""

    decision_id: Identifier
    conversation_id: Identifier
    customer_id: Identifier
    pool: PoolKind
    team_id: Identifier = Field(description="The pool id: the home team's id, or 'standard'")
    agent_id: Identifier | None = Field(default=None, description="None: waiting in the queue")
    reason: RoutingReason
    pool_reason: RoutingReason = Field(
        description="Why this pool: home_team, opt_out, after_hours or surge"
    )
    queue_position: int | None = None
    decided_at: AwareDatetime


class TransferRefused(InboundModel):
    """A transfer that would break the rules (another team, unknown or full agent)."""

    decision_id: Identifier
    conversation_id: Identifier
    customer_id: Identifier
    from_agent_id: Identifier
    to_agent_id: Identifier
    reason: Identifier = Field(description="outside_team, agent_unknown, agent_unavailable, ...")
    decided_at: AwareDatetime
