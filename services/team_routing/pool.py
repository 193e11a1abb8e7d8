"""A pool's state (agents' presence and load, placed and waiting conversations) and the pure
transitions that apply routing commands to it.

Team-routing is the single writer of each pool (records of ``routing.commands.v1`` are keyed
by pool id), so these transitions run one at a time per pool. Every transition takes its
``now`` from the command itself, so replaying a command after a crash decides the same way.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from shared.contracts.agents import Presence
from shared.contracts.common import Channel, PoolKind, RoutingReason, WaitingOn
from shared.contracts.pools import PoolStatusChanged
from shared.contracts.routing import (
    STANDARD_POOL_ID,
    ChangeConversationWeight,
    ConversationRouted,
    MoveToTeammate,
    MoveWaitingToStandard,
    OfferToTeammate,
    ReleaseConversation,
    ReturnWaitingHome,
    RouteConversation,
    SetAgentPresence,
    TransferRefused,
)
from shared.teams import TeamDirectory, is_open

from services.team_routing.decision import (
    AgentView,
    choose_agent,
    choose_pool,
    is_surging,
    known_agent_in_window,
)

EPOCH = datetime(1970, 1, 1).astimezone()


@dataclass(slots=True)
class Placement:
    """A conversation this pool holds: assigned to an agent, or waiting in the queue."""

    conversation_id: str
    customer_id: str
    agent_id: str | None
    waiting_on: WaitingOn
    priority: int
    enqueued_at: datetime
    pool_reason: RoutingReason
    known_agent_id: str | None = None
    known_agent_served_at: datetime | None = None
    assigned_at: datetime | None = None
    home_team_id: str | None = None
    channel: Channel = Channel.APP
    opted_out: bool = False

    def route_request(self, request_id: str, now: datetime, pool: PoolKind, reason: RoutingReason) -> RouteConversation:
        """The request that hands this waiting conversation to another pool."""
        return RouteConversation(
            request_id=request_id,
            conversation_id=self.conversation_id,
            customer_id=self.customer_id,
            home_team_id=self.home_team_id or "",
            opted_out=self.opted_out,
            channel=self.channel,
            known_agent_id=self.known_agent_id,
            known_agent_served_at=self.known_agent_served_at,
            waiting_on=self.waiting_on,
            priority=self.priority,
            forced_pool=pool,
            forced_reason=reason,
            requested_at=now,
        )


@dataclass(slots=True)
class AgentPresenceState:
    presence: Presence = Presence.OFFLINE
    idle_since: datetime = EPOCH


@dataclass(slots=True)
class PoolState:
    """A pool's agents and placements. Change placements only through ``add``, ``remove``,
    ``assign`` and ``set_waiting_on``: they keep the per-agent counts (``loads``) and the
    waiting set (``queue``) current, so a route command costs the same with ten or ten
    thousand open conversations (both were rebuilt from every placement per command), and
    the waiting set in service order and by age, so neither a queue's depth, its oldest wait
    nor a conversation's place in it needs a sort (sorting the whole queue for every command
    made team-routing the bottleneck once thousands waited)."""

    pool_id: str
    agents: dict[str, AgentPresenceState] = field(default_factory=dict)
    placements: dict[str, Placement] = field(default_factory=dict)
    applied: dict[str, int] = field(default_factory=dict)
    surging: bool = False
    # agent → [its conversations waiting on the agent, those waiting on the customer]
    held: dict[str, list[int]] = field(default_factory=dict, init=False, repr=False, compare=False)
    waiting: dict[str, Placement] = field(default_factory=dict, init=False, repr=False, compare=False)
    # The waiting placements' ``queue_key``s, sorted (service order), and (enqueued_at, id), sorted.
    _order: list[tuple[int, datetime, str]] = field(default_factory=list, init=False, repr=False, compare=False)
    _by_age: list[tuple[datetime, str]] = field(default_factory=list, init=False, repr=False, compare=False)
    # Each agent's ``AgentView`` as of the directory it was built for, and the agents whose
    # presence or load changed since (rebuilt at the next ``agent_views``): building every
    # view of the pool for each command was two thirds of a route command's cost.
    _views: dict[str, AgentView] = field(default_factory=dict, init=False, repr=False, compare=False)
    _views_for: TeamDirectory | None = field(default=None, init=False, repr=False, compare=False)
    _stale: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for p in self.placements.values():
            self._count(p, 1)

    @property
    def kind(self) -> PoolKind:
        return PoolKind.STANDARD if self.pool_id == STANDARD_POOL_ID else PoolKind.HOME_TEAM

    def _count(self, p: Placement, sign: int) -> None:
        if p.agent_id is None:
            if sign > 0:
                self._unqueue(p.conversation_id)
                self.waiting[p.conversation_id] = p
                insort(self._order, queue_key(p))
                insort(self._by_age, (p.enqueued_at, p.conversation_id))
            else:
                self._unqueue(p.conversation_id)
        else:
            self.held.setdefault(p.agent_id, [0, 0])[0 if p.waiting_on is WaitingOn.AGENT else 1] += sign
            self._stale.add(p.agent_id)

    def presence_of(self, agent_id: str) -> AgentPresenceState:
        """An agent's presence, to change: its view is rebuilt at the next ``agent_views``."""
        self._stale.add(agent_id)
        return self.agents.setdefault(agent_id, AgentPresenceState())

    def add(self, p: Placement) -> None:
        self.remove(p.conversation_id)
        self.placements[p.conversation_id] = p
        self._count(p, 1)

    def remove(self, conversation_id: str) -> Placement | None:
        p = self.placements.pop(conversation_id, None)
        if p is not None:
            self._count(p, -1)
        return p

    def assign(self, p: Placement, agent_id: str | None) -> None:
        """Give a held placement to ``agent_id`` (``None``: back to the queue)."""
        self._count(p, -1)
        p.agent_id = agent_id
        self._count(p, 1)

    def set_waiting_on(self, p: Placement, waiting_on: WaitingOn) -> None:
        self._count(p, -1)
        p.waiting_on = waiting_on
        self._count(p, 1)

    def _unqueue(self, conversation_id: str) -> None:
        p = self.waiting.pop(conversation_id, None)
        if p is not None:
            _discard(self._order, queue_key(p))
            _discard(self._by_age, (p.enqueued_at, p.conversation_id))

    def queue(self) -> list[Placement]:
        """Waiting conversations in service order: priority first, then longest waiting."""
        return [self.waiting[conversation_id] for _, _, conversation_id in self._order]

    def queue_depth(self) -> int:
        return len(self.waiting)

    def oldest_waiting_since(self) -> datetime | None:
        """When the longest-waiting conversation was queued (not necessarily the queue's head)."""
        return self._by_age[0][0] if self._by_age else None

    def position(self, conversation_id: str) -> int:
        """A waiting conversation's place in the queue, from 1."""
        return 1 + bisect_left(self._order, queue_key(self.waiting[conversation_id]))

    def agent_views(self, directory: TeamDirectory) -> dict[str, AgentView]:
        """Each agent of the pool as routing sees it (a new dict: callers may change it). Kept
        between calls; only the agents whose presence or load changed since (``_count``,
        ``presence_of``) are rebuilt, all of them for another directory. Change ``agents``
        only through ``presence_of``."""
        agents = directory.agents_of(self.pool_id)
        if directory is not self._views_for:
            self._views = self._build_views(directory, agents, agents.keys())
            self._views_for = directory
            self._stale.clear()
        elif self._stale:
            self._views.update(self._build_views(directory, agents, [a for a in self._stale if a in agents]))
            self._stale.clear()
        return dict(self._views)

    def _build_views(self, directory: TeamDirectory, agents: Mapping[str, Any], agent_ids: Iterable[str]) -> dict[str, AgentView]:
        on_agent, on_customer = directory.capacity.waiting_on_agent_weight, directory.capacity.waiting_on_customer_weight
        views = {}
        for agent_id in agent_ids:
            presence = self.agents.get(agent_id) or AgentPresenceState()
            for_agent, for_customer = self.held.get(agent_id) or (0, 0)
            views[agent_id] = AgentView(
                agent_id=agent_id,
                online=presence.presence is Presence.ONLINE,
                load=for_agent * on_agent + for_customer * on_customer if for_agent or for_customer else 0.0,
                max_concurrency=agents[agent_id].max_concurrency,
                idle_since=presence.idle_since,
            )
        return views


def queue_key(p: Placement) -> tuple[int, datetime, str]:
    """A waiting placement's place in service order: priority first, then longest waiting.
    (A placement's priority and ``enqueued_at`` never change once made: the pool finds a
    waiting one in its sorted lists by this key.)"""
    return (-p.priority, p.enqueued_at, p.conversation_id)


def _discard(ordered: list[Any], key: Any) -> None:
    i = bisect_left(ordered, key)
    if i < len(ordered) and ordered[i] == key:
        del ordered[i]


def weight_of(directory: TeamDirectory, waiting_on: WaitingOn) -> float:
    cap = directory.capacity
    return cap.waiting_on_agent_weight if waiting_on is WaitingOn.AGENT else cap.waiting_on_customer_weight


# What a transition produces: decisions keyed by customer, and route requests to hand to
# another pool (an overflow hop to the standard pool, or a return home).
@dataclass(frozen=True, slots=True)
class Decision:
    customer_id: str
    payload: ConversationRouted | TransferRefused


@dataclass(frozen=True, slots=True)
class Handoff:
    pool_id: str
    payload: RouteConversation


Output = Decision | Handoff


class Outputs:
    """Collects a transition's outputs and gives each a stable id derived from the input."""

    def __init__(self, input_id: str) -> None:
        self.input_id = input_id
        self.items: list[Output] = []

    def next_id(self) -> str:
        from shared.contracts.envelope import derived_id

        return derived_id(self.input_id, str(len(self.items)))

    def routed(self, state: PoolState, p: Placement, reason: RoutingReason, now: datetime, position: int | None = None) -> None:
        self.items.append(
            Decision(
                p.customer_id,
                ConversationRouted(
                    decision_id=self.next_id(),
                    conversation_id=p.conversation_id,
                    customer_id=p.customer_id,
                    pool=state.kind,
                    team_id=state.pool_id,
                    agent_id=p.agent_id,
                    reason=reason,
                    pool_reason=p.pool_reason,
                    queue_position=position,
                    decided_at=now,
                ),
            )
        )


def route(state: PoolState, cmd: RouteConversation, directory: TeamDirectory, out: Outputs) -> None:
    """Place a conversation: decide the pool (on the home team's partition), then the agent."""
    now = cmd.requested_at
    if cmd.conversation_id in state.placements:
        return  # already placed here: a redelivered or repeated request changes nothing
    window = timedelta(days=directory.relationship_window_days)
    known = known_agent_in_window(cmd.known_agent_id, cmd.known_agent_served_at, now, window)
    views = state.agent_views(directory)
    weight = weight_of(directory, cmd.waiting_on)

    if cmd.forced_pool is None and state.kind is PoolKind.HOME_TEAM:
        team = directory.team(state.pool_id)
        if team is None:
            from shared.runtime.dead_letter import PoisonMessage

            raise PoisonMessage("unknown_pool", f"no team {state.pool_id!r} in the directory")
        # The head of the queue is the highest priority, not necessarily the longest waiting.
        since = state.oldest_waiting_since()
        oldest = now - since if since is not None else None
        surging = is_surging(
            state.queue_depth(), oldest, team.surge.max_queue_depth, timedelta(seconds=team.surge.max_oldest_wait_seconds)
        )
        familiar = [a for a in (cmd.current_agent_id, known) if a and a in views and views[a].has_room(weight)]
        choice = choose_pool(
            opted_out=cmd.opted_out,
            team_open=is_open(team, now),
            surging=surging,
            agent_can_take_home=bool(familiar),
        )
        if choice.pool is PoolKind.STANDARD:
            out.items.append(
                Handoff(
                    STANDARD_POOL_ID,
                    cmd.model_copy(update={"forced_pool": PoolKind.STANDARD, "forced_reason": choice.reason}),
                )
            )
            return
        pool_reason = choice.reason
    else:
        pool_reason = cmd.forced_reason or (
            RoutingReason.HOME_TEAM if state.kind is PoolKind.HOME_TEAM else RoutingReason.OPT_OUT
        )

    agent = choose_agent(views, weight=weight, current_agent_id=cmd.current_agent_id, known_agent_id=known)
    placement = Placement(
        conversation_id=cmd.conversation_id,
        customer_id=cmd.customer_id,
        agent_id=agent.agent_id,
        waiting_on=cmd.waiting_on,
        priority=cmd.priority,
        enqueued_at=now,
        pool_reason=pool_reason,
        known_agent_id=cmd.known_agent_id,
        known_agent_served_at=cmd.known_agent_served_at,
        assigned_at=now if agent.agent_id else None,
        home_team_id=cmd.home_team_id,
        channel=cmd.channel,
        opted_out=cmd.opted_out,
    )
    state.add(placement)
    position = None
    if agent.agent_id is None:
        position = state.position(cmd.conversation_id)
    out.routed(state, placement, agent.reason, now, position)


def release(state: PoolState, cmd: ReleaseConversation, directory: TeamDirectory, out: Outputs) -> None:
    """A conversation ended: its agent's room frees up and the queue moves."""
    placement = state.remove(cmd.conversation_id)
    if placement is None:
        return
    if placement.agent_id is not None:
        _mark_idle(state, placement.agent_id, cmd.released_at)
        drain_queue(state, directory, cmd.released_at, out)


def change_weight(state: PoolState, cmd: ChangeConversationWeight, directory: TeamDirectory, out: Outputs) -> None:
    placement = state.placements.get(cmd.conversation_id)
    if placement is None or placement.waiting_on is cmd.waiting_on:
        return
    lighter = weight_of(directory, cmd.waiting_on) < weight_of(directory, placement.waiting_on)
    state.set_waiting_on(placement, cmd.waiting_on)
    if lighter and placement.agent_id is not None:
        drain_queue(state, directory, cmd.changed_at, out)


def transfer(state: PoolState, cmd: MoveToTeammate, directory: TeamDirectory, out: Outputs) -> None:
    """Hand a conversation to a teammate; anything else is refused with a reason."""
    now = cmd.requested_at
    placement = state.placements.get(cmd.conversation_id)
    reason: str | None = None
    target_pool = directory.pool_of_agent(cmd.to_agent_id)
    views = state.agent_views(directory)
    if target_pool is None:
        reason = "agent_unknown"
    elif target_pool != state.pool_id:
        reason = "outside_team"
    elif placement is None:
        reason = "not_in_pool"
    elif placement.agent_id == cmd.to_agent_id:
        reason = "already_assigned"
    elif not views[cmd.to_agent_id].online:
        reason = "agent_unavailable"
    elif not views[cmd.to_agent_id].has_room(weight_of(directory, placement.waiting_on)):
        reason = "agent_at_capacity"
    if reason is not None:
        out.items.append(
            Decision(
                cmd.customer_id,
                TransferRefused(
                    decision_id=out.next_id(),
                    conversation_id=cmd.conversation_id,
                    customer_id=cmd.customer_id,
                    from_agent_id=cmd.from_agent_id,
                    to_agent_id=cmd.to_agent_id,
                    reason=reason,
                    decided_at=now,
                ),
            )
        )
        return
    assert placement is not None
    previous = placement.agent_id
    state.assign(placement, cmd.to_agent_id)
    placement.assigned_at = now
    out.routed(state, placement, RoutingReason.TRANSFER, now)
    if previous is not None:
        _mark_idle(state, previous, now)
        drain_queue(state, directory, now, out)


def set_presence(state: PoolState, cmd: SetAgentPresence, directory: TeamDirectory, out: Outputs) -> None:
    """Presence changes: an agent coming online takes from the queue; one going offline hands
    their conversations to teammates (or back to the queue)."""
    now = cmd.changed_at
    if cmd.agent_id not in directory.agents_of(state.pool_id):
        return  # not (or no longer) in this pool
    agent = state.presence_of(cmd.agent_id)
    if agent.presence is cmd.presence:
        return
    agent.presence = cmd.presence
    if cmd.presence is Presence.ONLINE:
        agent.idle_since = now
        drain_queue(state, directory, now, out)
    elif cmd.presence is Presence.OFFLINE:
        # Also when signing out from "away": an away agent keeps their conversations, a
        # signed-out one must not.
        reassign_from(state, cmd.agent_id, directory, now, out, RoutingReason.AGENT_OFFLINE)


def reassign_from(
    state: PoolState,
    agent_id: str,
    directory: TeamDirectory,
    now: datetime,
    out: Outputs,
    reason: RoutingReason,
    only: set[str] | None = None,
) -> None:
    """Move an agent's conversations (or just ``only`` of them) to teammates with room, or back
    to the queue; never outside the pool."""
    window = timedelta(days=directory.relationship_window_days)
    mine = sorted(
        (p for p in state.placements.values() if p.agent_id == agent_id and (only is None or p.conversation_id in only)),
        key=lambda p: (p.enqueued_at, p.conversation_id),
    )
    for placement in mine:
        state.assign(placement, None)
        views = state.agent_views(directory)
        known = known_agent_in_window(placement.known_agent_id, placement.known_agent_served_at, now, window)
        choice = choose_agent(
            views, weight=weight_of(directory, placement.waiting_on), known_agent_id=known, exclude=(agent_id,)
        )
        if choice.agent_id is None:
            position = state.position(placement.conversation_id)
            out.routed(state, placement, RoutingReason.QUEUED, now, position)
        else:
            state.assign(placement, choice.agent_id)
            placement.assigned_at = now
            out.routed(state, placement, reason, now)


def drain_queue(state: PoolState, directory: TeamDirectory, now: datetime, out: Outputs) -> None:
    """Assign waiting conversations, in queue order, to agents who have room."""
    window = timedelta(days=directory.relationship_window_days)
    views = state.agent_views(directory)
    lightest = min(directory.capacity.waiting_on_agent_weight, directory.capacity.waiting_on_customer_weight)
    for placement in state.queue():
        if not any(v.has_room(lightest) for v in views.values()):
            return
        known = known_agent_in_window(placement.known_agent_id, placement.known_agent_served_at, now, window)
        weight = weight_of(directory, placement.waiting_on)
        choice = choose_agent(views, weight=weight, known_agent_id=known)
        if choice.agent_id is not None:
            state.assign(placement, choice.agent_id)
            placement.assigned_at = now
            chosen = views[choice.agent_id]
            views[choice.agent_id] = replace(chosen, load=chosen.load + weight)
            out.routed(state, placement, choice.reason, now)


def _mark_idle(state: PoolState, agent_id: str, now: datetime) -> None:
    agent = state.presence_of(agent_id)
    agent.idle_since = max(agent.idle_since, now)


def surge_now(state: PoolState, directory: TeamDirectory, now: datetime) -> bool:
    """Is this home team in a surge? It starts when the queue is at least as deep, or its
    longest wait at least as long, as the team's thresholds, and ends only when both are back
    to half of them, so a team at the edge does not flap between sending conversations away
    and calling them back. The standard pool never surges."""
    team = directory.team(state.pool_id)
    if team is None:
        return False
    since, queued = state.oldest_waiting_since(), state.queue_depth()
    oldest = now - since if since is not None else None
    depth, wait = team.surge.max_queue_depth, timedelta(seconds=team.surge.max_oldest_wait_seconds)
    if state.surging:
        return not (queued <= depth // 2 and (oldest is None or oldest <= wait / 2))
    return is_surging(queued, oldest, depth, wait)


def offer_to_teammate(state: PoolState, cmd: OfferToTeammate, directory: TeamDirectory, out: Outputs) -> None:
    """The agent missed the response target: a teammate with room takes the conversation;
    if nobody has room it stays where it is."""
    placement = state.placements.get(cmd.conversation_id)
    if placement is None or placement.agent_id != cmd.agent_id or placement.waiting_on is not WaitingOn.AGENT:
        return  # answered, moved or ended since the deadline was set
    choice = choose_agent(
        state.agent_views(directory), weight=weight_of(directory, placement.waiting_on), exclude=(cmd.agent_id,)
    )
    if choice.agent_id is None:
        return
    state.assign(placement, choice.agent_id)
    placement.assigned_at = cmd.due_at
    out.routed(state, placement, RoutingReason.RESPONSE_TARGET_MISSED, cmd.due_at)


def move_waiting_to_standard(state: PoolState, cmd: MoveWaitingToStandard, directory: TeamDirectory, out: Outputs) -> None:
    """The team closed: conversations still waiting in its queue go to the standard pool."""
    if state.kind is not PoolKind.HOME_TEAM:
        return
    for placement in state.queue():
        state.remove(placement.conversation_id)
        out.items.append(
            Handoff(STANDARD_POOL_ID, placement.route_request(out.next_id(), cmd.at, PoolKind.STANDARD, RoutingReason.AFTER_HOURS))
        )


def return_waiting_home(state: PoolState, cmd: ReturnWaitingHome, directory: TeamDirectory, out: Outputs) -> None:
    """The team opened or its surge cleared: its customers still waiting in the standard pool
    (sent there after hours or by the surge, not by their own opt-out) return home."""
    if state.kind is not PoolKind.STANDARD:
        return
    for placement in state.queue():
        if placement.home_team_id != cmd.team_id or placement.pool_reason not in (RoutingReason.AFTER_HOURS, RoutingReason.SURGE):
            continue
        state.remove(placement.conversation_id)
        out.items.append(
            Handoff(cmd.team_id, placement.route_request(out.next_id(), cmd.at, PoolKind.HOME_TEAM, RoutingReason.RETURNED_HOME))
        )


APPLY: dict[type, Any] = {
    RouteConversation: route,
    ReleaseConversation: release,
    ChangeConversationWeight: change_weight,
    MoveToTeammate: transfer,
    SetAgentPresence: set_presence,
    OfferToTeammate: offer_to_teammate,
    MoveWaitingToStandard: move_waiting_to_standard,
    ReturnWaitingHome: return_waiting_home,
}


def command_time(command: Any) -> datetime:
    for name in ("requested_at", "released_at", "changed_at", "due_at", "at"):
        value = getattr(command, name, None)
        if value is not None:
            return value
    raise TypeError(f"{type(command).__name__} carries no time")


def apply_command(state: PoolState, command: Any, directory: TeamDirectory, input_id: str) -> list[Output]:
    """Apply one routing command to a pool; returns what to publish. When a home team's surge
    clears, its overflowed conversations are called back from the standard pool."""
    out = Outputs(input_id)
    APPLY[type(command)](state, command, directory, out)
    if state.kind is PoolKind.HOME_TEAM:
        surging = surge_now(state, directory, command_time(command))
        if state.surging and not surging:
            out.items.append(
                Handoff(
                    STANDARD_POOL_ID,
                    ReturnWaitingHome(request_id=out.next_id(), team_id=state.pool_id, at=command_time(command)),
                )
            )
        state.surging = surging
    return out.items


def status_of(state: PoolState, directory: TeamDirectory, now: datetime) -> PoolStatusChanged:
    """The pool's queue and staffing as dashboards and the metrics service see it."""
    views = state.agent_views(directory)
    online = [v for v in views.values() if v.online]
    return PoolStatusChanged(
        pool_id=state.pool_id,
        kind=state.kind,
        queue_depth=state.queue_depth(),
        oldest_waiting_since=state.oldest_waiting_since(),
        agents_online=len(online),
        capacity_online=float(sum(v.max_concurrency for v in online)),
        load=sum(v.load for v in views.values()),
        surging=state.surging,
        at=now,
    )
