"""Which deadlines the conversation lifecycle arms and cancels, and what each one does when it
falls due: pure functions over events, the team directory and an explicit ``now``.

- inactivity: a conversation waiting on the customer closes as inactive at ``inactive_after``
  (computed by conversation-state from the customer's own reply delays);
- response: an assigned conversation waiting on the agent is offered to a teammate when the
  agent has not replied within the team's response target;
- callback: at the time the customer chose, a conversation is queued with priority;
- hours: when a team closes its waiting conversations move to the standard pool; when it
  opens, its customers still waiting in the standard pool come home.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from shared.contracts import conversations as ev
from shared.contracts.common import ConversationStatus, Direction
from shared.contracts.envelope import derived_id
from shared.contracts.lifecycle import CloseInactiveConversation, StartCallback
from shared.contracts.registry import LIFECYCLE_COMMANDS, ROUTING_COMMANDS
from shared.contracts.routing import STANDARD_POOL_ID, MoveWaitingToStandard, OfferToTeammate, ReturnWaitingHome
from shared.teams import TeamDirectory, is_open

INACTIVITY, RESPONSE, CALLBACK, HOURS = "inactivity", "response", "callback", "hours"


@dataclass(frozen=True, slots=True)
class Arm:
    """Set (or replace) the deadline of ``kind`` for ``entity``; ``version`` orders arms."""

    kind: str
    entity: str
    due_at: datetime
    version: str
    data: dict[str, Any]
    only_if_absent: bool = False

    @property
    def doc_id(self) -> str:
        return f"{self.kind}:{self.entity}@{self.version}"


@dataclass(frozen=True, slots=True)
class Cancel:
    kind: str
    entity: str


Change = Arm | Cancel


def changes_for(event: BaseModel, sequence: int, directory: TeamDirectory) -> list[Change]:
    """The deadline changes one conversation event implies (``sequence``: its per-customer
    order, which versions the deadlines it arms)."""
    version = f"{sequence:012d}"
    if isinstance(event, ev.ConversationStatusChanged):
        if event.status is ConversationStatus.WAITING_ON_CUSTOMER and event.inactive_after is not None:
            return [
                Arm(INACTIVITY, event.conversation_id, event.inactive_after, version,
                    {"customer_id": event.customer_id, "conversation_id": event.conversation_id}),
                Cancel(RESPONSE, event.conversation_id),
            ]
        if event.status is ConversationStatus.WAITING_ON_AGENT:
            return [Cancel(INACTIVITY, event.conversation_id)]
        return [Cancel(INACTIVITY, event.conversation_id), Cancel(RESPONSE, event.conversation_id)]
    if isinstance(event, ev.ConversationAssigned):
        return [_response(event.conversation_id, event.customer_id, event.team_id, event.agent_id, event.at, version, directory, False)]
    if isinstance(event, ev.MessageAdded):
        if event.direction is Direction.OUTBOUND:
            return [Cancel(RESPONSE, event.conversation_id)]
        if event.agent_id and event.team_id:
            # The customer wrote to an assigned conversation: the clock starts now, unless it
            # is already running from an earlier unanswered message.
            return [_response(event.conversation_id, event.customer_id, event.team_id, event.agent_id, event.at, version, directory, True)]
        return []
    if isinstance(event, (ev.ConversationResolved, ev.ConversationClosed)):
        return [Cancel(INACTIVITY, event.conversation_id), Cancel(RESPONSE, event.conversation_id)]
    if isinstance(event, ev.CallbackScheduled):
        return [Arm(CALLBACK, event.callback_id, event.due_at, version, {"customer_id": event.customer_id})]
    return []


def _response(
    conversation_id: str, customer_id: str, pool_id: str, agent_id: str, at: datetime, version: str, directory: TeamDirectory, only_if_absent: bool
) -> Change:
    team = directory.team(pool_id)
    target = timedelta(seconds=team.response_target_seconds if team else directory.standard_pool_response_target_seconds)
    return Arm(
        RESPONSE,
        conversation_id,
        at + target,
        version,
        {"customer_id": customer_id, "conversation_id": conversation_id, "pool_id": pool_id, "agent_id": agent_id},
        only_if_absent=only_if_absent,
    )


def collapse(changes: list[Change]) -> dict[tuple[str, str], Change]:
    """The net change per (kind, entity) of a batch: the last one wins, except that an
    'only if absent' arm never replaces an arm made earlier in the batch, and one that follows
    a cancel in the batch arms unconditionally (after the cancel nothing runs: an agent's
    reply, then the customer's next message, must restart the clock, not keep the old one)."""
    net: dict[tuple[str, str], Change] = {}
    for change in changes:
        key = (change.kind, change.entity)
        if isinstance(change, Arm) and change.only_if_absent:
            earlier = net.get(key)
            if isinstance(earlier, Arm):
                continue
            if isinstance(earlier, Cancel):
                change = replace(change, only_if_absent=False)
        net[key] = change
    return net


def hours_deadline(team_id: str, due_at: datetime) -> Arm:
    return Arm(HOURS, team_id, due_at, due_at.strftime("%Y%m%dT%H%M%S"), {"team_id": team_id})


@dataclass(frozen=True, slots=True)
class Firing:
    """What a due deadline publishes: the topic, the key and the command."""

    topic: str
    key: str
    command: BaseModel


def firing_for(doc: dict[str, Any], directory: TeamDirectory) -> Firing | None:
    """The command a due deadline sends; its id is derived from the deadline's id, so a
    deadline fired twice (a sweeper died mid-way) sends the same command twice, which the
    receivers drop."""
    kind, due_at, data, doc_id = doc["kind"], doc["due_at"], doc["data"], doc["_id"]
    command_id = derived_id("deadline", doc_id)
    if kind == INACTIVITY:
        return Firing(LIFECYCLE_COMMANDS.name, data["customer_id"], CloseInactiveConversation(
            command_id=command_id, customer_id=data["customer_id"], conversation_id=data["conversation_id"], deadline=due_at))
    if kind == CALLBACK:
        return Firing(LIFECYCLE_COMMANDS.name, data["customer_id"], StartCallback(
            command_id=command_id, customer_id=data["customer_id"], callback_id=doc["entity"], due_at=due_at))
    if kind == RESPONSE:
        return Firing(ROUTING_COMMANDS.name, data["pool_id"], OfferToTeammate(
            request_id=command_id, conversation_id=data["conversation_id"], customer_id=data["customer_id"], agent_id=data["agent_id"], due_at=due_at))
    if kind == HOURS:
        team = directory.team(data["team_id"])
        if team is None:
            return None
        if is_open(team, due_at):
            return Firing(ROUTING_COMMANDS.name, STANDARD_POOL_ID, ReturnWaitingHome(request_id=command_id, team_id=team.id, at=due_at))
        return Firing(ROUTING_COMMANDS.name, team.id, MoveWaitingToStandard(request_id=command_id, team_id=team.id, at=due_at))
    return None


def claim_attempt(due_at: datetime, now: datetime, lease: timedelta) -> int:
    """Which claim attempt ``now`` belongs to: one claim per lease period after the deadline,
    so a sweeper that died holding a claim is replaced after one lease, and two live sweepers
    never hold the same attempt (claims are unique documents)."""
    return max(0, math.floor((now - due_at) / lease))
