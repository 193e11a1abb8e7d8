"""A pool's state machine: ``apply_command`` for route, release, re-weigh, transfer and presence.

The directory is tiny: team ``west`` (Los Angeles, weekdays 08:00-20:00, surge at 3 queued or a
10-minute oldest wait) with ana (2 slots), ben (2) and cy (3); team ``east`` with one agent, only
so that a transfer outside the team can be tried; the standard pool with std-1 (2). A conversation
waiting on the agent weighs 1.0, one waiting on the customer 0.5.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.team_routing.pool import Decision, Handoff, Output, PoolState, apply_command
from shared.contracts.agents import Presence
from shared.contracts.common import Channel, PoolKind, RoutingReason, WaitingOn
from shared.contracts.envelope import derived_id
from shared.contracts.routing import (
    ChangeConversationWeight,
    ConversationRouted,
    MoveToTeammate,
    MoveWaitingToStandard,
    OfferToTeammate,
    ReleaseConversation,
    ReturnWaitingHome,
    RouteConversation,
    STANDARD_POOL_ID,
    SetAgentPresence,
    TransferRefused,
)
from shared.runtime.dead_letter import PoisonMessage
from shared.teams import parse_directory

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri")
DIRECTORY_SOURCE: dict[str, Any] = {
    "relationship_window_days": 30,
    "capacity": {"waiting_on_agent_weight": 1.0, "waiting_on_customer_weight": 0.5},
    "default_team": "west",
    "standard_pool": {"agents": [{"id": "std-1", "max_concurrency": 2}]},
    "teams": [
        {
            "id": "west",
            "name": "West",
            "timezone": "America/Los_Angeles",
            "hours": {day: ["08:00-20:00"] for day in WEEKDAYS},
            "surge": {"max_queue_depth": 3, "max_oldest_wait_seconds": 600},
            "agents": [
                {"id": "ana", "max_concurrency": 2},
                {"id": "ben", "max_concurrency": 2},
                {"id": "cy", "max_concurrency": 3},
            ],
        },
        {
            "id": "east",
            "name": "East",
            "timezone": "America/New_York",
            "hours": {day: ["08:00-20:00"] for day in WEEKDAYS},
            "agents": [{"id": "e-dan", "max_concurrency": 2}],
        },
    ],
}
DIRECTORY = parse_directory(DIRECTORY_SOURCE)

T0 = datetime(2026, 11, 16, 18, 0, tzinfo=UTC)  # Monday 10:00 in Los Angeles: west is open
AFTER_HOURS = datetime(2026, 11, 17, 5, 0, tzinfo=UTC)  # Monday 21:00 in Los Angeles: closed

HOME, STANDARD = RoutingReason.HOME_TEAM, PoolKind.STANDARD
LEAST, KNOWN, CURRENT = RoutingReason.LEAST_LOADED, RoutingReason.KNOWN_AGENT, RoutingReason.CURRENT_AGENT
QUEUED, TRANSFER, OFFLINE = RoutingReason.QUEUED, RoutingReason.TRANSFER, RoutingReason.AGENT_OFFLINE


def at(minute: float) -> datetime:
    return T0 + timedelta(minutes=minute)


# --- commands ------------------------------------------------------------------------------


def route(conversation: str, minute: float = 0, *, when: datetime | None = None, **fields: Any) -> RouteConversation:
    return RouteConversation(
        request_id=f"route-{conversation}",
        conversation_id=conversation,
        customer_id=f"cust-{conversation}",
        home_team_id="west",
        channel=Channel.SMS,
        requested_at=when or at(minute),
        **fields,
    )


def release(conversation: str, minute: float) -> ReleaseConversation:
    return ReleaseConversation(
        request_id=f"release-{conversation}",
        conversation_id=conversation,
        customer_id=f"cust-{conversation}",
        released_at=at(minute),
    )


def reweigh(conversation: str, waiting_on: WaitingOn, minute: float) -> ChangeConversationWeight:
    return ChangeConversationWeight(
        request_id=f"weigh-{conversation}-{minute}",
        conversation_id=conversation,
        customer_id=f"cust-{conversation}",
        waiting_on=waiting_on,
        changed_at=at(minute),
    )


def move(conversation: str, to: str, minute: float, from_: str = "ana") -> MoveToTeammate:
    return MoveToTeammate(
        request_id=f"move-{conversation}-{to}",
        conversation_id=conversation,
        customer_id=f"cust-{conversation}",
        from_agent_id=from_,
        to_agent_id=to,
        requested_at=at(minute),
    )


def presence(agent: str, state: Presence, minute: float) -> SetAgentPresence:
    return SetAgentPresence(
        request_id=f"presence-{agent}-{minute}", agent_id=agent, presence=state, changed_at=at(minute)
    )


def online(*agents: str) -> list[SetAgentPresence]:
    """Agents sign in an hour before T0, one minute apart: the first listed has been idle longest."""
    return [presence(a, Presence.ONLINE, -60 + i) for i, a in enumerate(agents)]


def pinned(agent: str, *conversations: str, minute: float = -10, **fields: Any) -> list[RouteConversation]:
    """Give ``agent`` these conversations (as their current agent), one minute apart."""
    return [route(c, minute + i, current_agent_id=agent, **fields) for i, c in enumerate(conversations)]


# --- running and reading -------------------------------------------------------------------


def _rebuilt_loads(state: PoolState, directory: Any) -> dict[str, float]:
    from services.team_routing.pool import weight_of

    loads = dict.fromkeys(directory.agents_of(state.pool_id), 0.0)
    for p in state.placements.values():
        if p.agent_id is not None:
            loads[p.agent_id] = loads.get(p.agent_id, 0.0) + weight_of(directory, p.waiting_on)
    return loads


def _rebuilt_views(state: PoolState, directory: Any) -> dict[str, Any]:
    """Every agent's view built from scratch (the pool keeps them and rebuilds only changed ones)."""
    from services.team_routing.decision import AgentView
    from services.team_routing.pool import AgentPresenceState

    loads = _rebuilt_loads(state, directory)
    views = {}
    for agent_id, agent in directory.agents_of(state.pool_id).items():
        presence = state.agents.get(agent_id) or AgentPresenceState()
        views[agent_id] = AgentView(
            agent_id=agent_id,
            online=presence.presence is Presence.ONLINE,
            load=loads[agent_id],
            max_concurrency=agent.max_concurrency,
            idle_since=presence.idle_since,
        )
    return views


def _rebuilt_queue(state: PoolState) -> list[str]:
    waiting = [p for p in state.placements.values() if p.agent_id is None]
    return [p.conversation_id for p in sorted(waiting, key=lambda p: (-p.priority, p.enqueued_at, p.conversation_id))]


@pytest.fixture(autouse=True)
def _counts_follow_every_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """In every test of this module: after each command the pool's kept counts equal what a
    rebuild from all placements and presences gives (each agent's view with its load, the queue)."""
    import sys

    from services.team_routing import pool

    def checked(state: PoolState, command: Any, directory: Any, input_id: str) -> list[Output]:
        outputs = pool.apply_command(state, command, directory, input_id)
        assert state.agent_views(directory) == _rebuilt_views(state, directory)
        assert [p.conversation_id for p in state.queue()] == _rebuilt_queue(state)
        return outputs

    monkeypatch.setattr(sys.modules[__name__], "apply_command", checked)


def apply_all(state: PoolState, commands: list[Any], prefix: str = "in") -> list[list[Output]]:
    return [apply_command(state, c, DIRECTORY, f"{prefix}-{state.pool_id}-{i}") for i, c in enumerate(commands)]


def given(commands: list[Any], pool_id: str = "west") -> PoolState:
    state = PoolState(pool_id)
    apply_all(state, commands, prefix="setup")
    return state


def apply(state: PoolState, command: Any, input_id: str = "input-under-test") -> list[Output]:
    return apply_command(state, command, DIRECTORY, input_id)


def without_surge_recall(outputs: list[Output]) -> list[Output]:
    """Outputs other than the recall of overflowed conversations when a surge clears (tested
    on its own below)."""
    return [o for o in outputs if not (isinstance(o, Handoff) and isinstance(o.payload, ReturnWaitingHome))]


def routed(outputs: list[Output]) -> list[tuple[str, str | None, RoutingReason, RoutingReason, int | None]]:
    """(conversation, agent, reason, pool_reason, queue_position) of each ConversationRouted, and
    checks every one was decided in this pool's home team with the customer as key."""
    rows = []
    for output in without_surge_recall(outputs):
        assert isinstance(output, Decision), output
        payload = output.payload
        assert isinstance(payload, ConversationRouted), payload
        assert output.customer_id == payload.customer_id
        rows.append((payload.conversation_id, payload.agent_id, payload.reason, payload.pool_reason, payload.queue_position))
    return rows


def loads(state: PoolState) -> dict[str, float]:
    return {agent_id: view.load for agent_id, view in state.agent_views(DIRECTORY).items()}


def holder(state: PoolState, conversation: str) -> str | None:
    return state.placements[conversation].agent_id


# --- first placement in the home team -------------------------------------------------------


def test_first_route_in_hours_is_a_full_decision_for_the_home_team() -> None:
    state = given(online("ana", "ben"))
    outputs = apply(state, route("c1", 0))
    assert outputs == [
        Decision(
            "cust-c1",
            ConversationRouted(
                decision_id=derived_id("input-under-test", "0"),
                conversation_id="c1",
                customer_id="cust-c1",
                pool=PoolKind.HOME_TEAM,
                team_id="west",
                agent_id="ana",
                reason=LEAST,
                pool_reason=HOME,
                queue_position=None,
                decided_at=at(0),
            ),
        )
    ]
    assert loads(state) == {"ana": 1.0, "ben": 0.0, "cy": 0.0}


@pytest.mark.parametrize(
    ("setup", "command", "expected"),
    [
        pytest.param(online("ana", "ben"), route("c1"), ("ana", LEAST), id="equal-load-longest-idle"),
        pytest.param(online("ben", "ana"), route("c1"), ("ben", LEAST), id="equal-load-longest-idle-other-order"),
        pytest.param(online("ana", "ben") + pinned("ana", "p1"), route("c1"), ("ben", LEAST), id="least-loaded"),
        pytest.param(
            online("ana", "ben", "cy") + pinned("ana", "p1", "p2") + pinned("ben", "p3") + pinned("cy", "p4"),
            route("c1"),
            ("cy", LEAST),
            id="share-of-capacity-1-of-3-beats-1-of-2",
        ),
        pytest.param(
            online("ben") + pinned("ben", "p1"),
            route("c1"),
            ("ben", LEAST),
            id="offline-agents-never-chosen",
        ),
        pytest.param(
            online("ana", "ben") + [presence("ana", Presence.AWAY, -5)] + pinned("ben", "p1"),
            route("c1"),
            ("ben", LEAST),
            id="away-agent-never-chosen",
        ),
        pytest.param(
            online("ana", "cy") + pinned("cy", "p1", "p2"),
            route("c1", known_agent_id="cy", known_agent_served_at=at(-10 * 24 * 60)),
            ("cy", KNOWN),
            id="known-agent-within-window-with-room",
        ),
        pytest.param(
            online("ana", "cy") + pinned("cy", "p1", "p2"),
            route("c1", known_agent_id="cy", known_agent_served_at=at(-31 * 24 * 60)),
            ("ana", LEAST),
            id="known-agent-outside-window",
        ),
        pytest.param(
            online("ana", "ben") + pinned("ben", "p1", "p2"),
            route("c1", known_agent_id="ben", known_agent_served_at=at(-60)),
            ("ana", LEAST),
            id="known-agent-without-room",
        ),
        pytest.param(
            online("ana", "ben") + pinned("ben", "p1", "p2"),
            route("c1", current_agent_id="ben"),
            ("ben", CURRENT),
            id="current-agent-kept-at-capacity",
        ),
    ],
)
def test_route_in_hours_picks_the_agent(setup: list[Any], command: RouteConversation, expected: tuple[str, RoutingReason]) -> None:
    state = given(setup)
    [(conversation, agent, reason, pool_reason, position)] = routed(apply(state, command))
    assert (conversation, agent, reason, pool_reason, position) == ("c1", *expected, HOME, None)
    assert holder(state, "c1") == expected[0]


# --- overflow to the standard pool ----------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        pytest.param(route("c1", when=AFTER_HOURS), RoutingReason.AFTER_HOURS, id="after-hours"),
        pytest.param(route("c1", opted_out=True), RoutingReason.OPT_OUT, id="opted-out-in-hours"),
        pytest.param(route("c1", when=AFTER_HOURS, opted_out=True), RoutingReason.OPT_OUT, id="opted-out-after-hours"),
        pytest.param(
            route("c1", when=AFTER_HOURS, known_agent_id="ana", known_agent_served_at=at(-60)),
            RoutingReason.AFTER_HOURS,
            id="after-hours-even-with-known-agent-online",
        ),
    ],
)
def test_overflow_is_a_handoff_to_the_standard_pool(command: RouteConversation, reason: RoutingReason) -> None:
    state = given(online("ana", "ben"))  # agents with room: capacity is not why it leaves
    outputs = apply(state, command)
    assert outputs == [
        Handoff("standard", command.model_copy(update={"forced_pool": STANDARD, "forced_reason": reason}))
    ]
    assert state.placements == {}


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        pytest.param(route("c1", when=AFTER_HOURS), RoutingReason.AFTER_HOURS, id="after-hours"),
        pytest.param(route("c1", opted_out=True), RoutingReason.OPT_OUT, id="opt-out"),
    ],
)
def test_handed_off_command_is_placed_in_the_standard_pool(command: RouteConversation, reason: RoutingReason) -> None:
    [handoff] = apply(given(online("ana")), command)
    assert isinstance(handoff, Handoff)
    standard = given([presence("std-1", Presence.ONLINE, -60)], pool_id="standard")
    [decision] = apply(standard, handoff.payload)
    assert isinstance(decision, Decision)
    payload = decision.payload
    assert isinstance(payload, ConversationRouted)
    assert (payload.pool, payload.team_id, payload.agent_id, payload.reason, payload.pool_reason) == (
        STANDARD,
        "standard",
        "std-1",
        LEAST,
        reason,
    )
    assert loads(standard) == {"std-1": 1.0}


def test_standard_pool_without_room_queues_there() -> None:
    [handoff] = apply(given([]), route("c1", when=AFTER_HOURS))
    assert isinstance(handoff, Handoff)
    standard = given([], pool_id="standard")
    [decision] = apply(standard, handoff.payload)
    assert isinstance(decision.payload, ConversationRouted)
    assert (decision.payload.pool, decision.payload.team_id, decision.payload.agent_id, decision.payload.queue_position) == (
        STANDARD,
        "standard",
        None,
        1,
    )


def test_team_agent_presence_is_ignored_by_another_pool() -> None:
    state = given([], pool_id="standard")
    assert apply(state, presence("ana", Presence.ONLINE, 0)) == []
    assert "ana" not in state.agents


def test_route_to_a_pool_missing_from_the_directory_is_poison() -> None:
    with pytest.raises(PoisonMessage) as raised:
        apply(PoolState("gone-team"), route("c1"))
    assert raised.value.reason == "unknown_pool"


# --- idempotence -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(online("ana"), id="while-assigned"),
        pytest.param([], id="while-queued"),
    ],
)
def test_duplicate_route_for_the_same_conversation_has_no_outputs(setup: list[Any]) -> None:
    state = given(setup)
    first = apply(state, route("c1", 0), "first")
    assert len(first) == 1
    before = (dict(state.placements), loads(state), [p.conversation_id for p in state.queue()])
    assert apply(state, route("c1", 1, current_agent_id="ben"), "second") == []
    assert (dict(state.placements), loads(state), [p.conversation_id for p in state.queue()]) == before


# --- the queue -------------------------------------------------------------------------------

# ana and ben are full (two conversations each); cy is offline; three wait: two of normal
# priority (q-old, then q-new) and one of priority 5 (q-vip) that arrived last.
FULL_WITH_QUEUE = (
    online("ana", "ben")
    + pinned("ana", "a1", "a2", minute=-20)
    + pinned("ben", "b1", "b2", minute=-15)
    + [route("q-old", 1), route("q-new", 2), route("q-vip", 3, priority=5)]
)


def test_everyone_full_queues_with_positions_priority_first() -> None:
    state = given(online("ana", "ben") + pinned("ana", "a1", "a2") + pinned("ben", "b1", "b2", minute=-5))
    outcomes = [routed(apply(state, cmd))[0] for cmd in (route("q-old", 1), route("q-new", 2), route("q-vip", 3, priority=5))]
    assert outcomes == [
        ("q-old", None, QUEUED, HOME, 1),
        ("q-new", None, QUEUED, HOME, 2),
        ("q-vip", None, QUEUED, HOME, 1),
    ]
    assert [p.conversation_id for p in state.queue()] == ["q-vip", "q-old", "q-new"]


def test_release_assigns_the_head_of_the_queue_priority_then_oldest() -> None:
    state = given(FULL_WITH_QUEUE)
    assert routed(apply(state, release("a1", 10))) == [("q-vip", "ana", LEAST, HOME, None)]
    assert routed(apply(state, release("b1", 11))) == [("q-old", "ben", LEAST, HOME, None)]
    assert routed(apply(state, release("a2", 12))) == [("q-new", "ana", LEAST, HOME, None)]
    assert state.queue() == []
    assert loads(state) == {"ana": 2.0, "ben": 2.0, "cy": 0.0}


@pytest.mark.parametrize(
    ("command", "queue_after"),
    [
        pytest.param(release("q-old", 10), ["q-vip", "q-new"], id="release-a-queued-conversation"),
        pytest.param(release("never-seen", 10), ["q-vip", "q-old", "q-new"], id="release-unknown-conversation"),
    ],
)
def test_release_without_freed_room_assigns_nobody(command: ReleaseConversation, queue_after: list[str]) -> None:
    state = given(FULL_WITH_QUEUE)
    assert without_surge_recall(apply(state, command)) == []
    assert [p.conversation_id for p in state.queue()] == queue_after


def test_agent_coming_online_drains_the_queue_in_order() -> None:
    state = given(FULL_WITH_QUEUE)
    assert routed(apply(state, presence("cy", Presence.ONLINE, 10))) == [
        ("q-vip", "cy", LEAST, HOME, None),
        ("q-old", "cy", LEAST, HOME, None),
        ("q-new", "cy", LEAST, HOME, None),
    ]
    assert loads(state) == {"ana": 2.0, "ben": 2.0, "cy": 3.0}


def test_agent_coming_back_from_away_takes_only_what_fits() -> None:
    # cy stepped away holding 2 of 3 slots (away keeps conversations); ana and ben are full.
    state = given(
        [presence("cy", Presence.ONLINE, -60)]
        + pinned("cy", "c1", "c2", minute=-40)
        + [presence("cy", Presence.AWAY, -30), presence("ana", Presence.ONLINE, -29), presence("ben", Presence.ONLINE, -28)]
        + pinned("ana", "a1", "a2", minute=-20)
        + pinned("ben", "b1", "b2", minute=-15)
        + [route("q-old", 1), route("q-new", 2)]
    )
    assert (holder(state, "c1"), holder(state, "c2")) == ("cy", "cy")
    assert [p.conversation_id for p in state.queue()] == ["q-old", "q-new"]
    assert routed(apply(state, presence("cy", Presence.ONLINE, 10))) == [("q-old", "cy", LEAST, HOME, None)]
    assert [p.conversation_id for p in state.queue()] == ["q-new"]


# --- agents going offline ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "before_offline",
    [
        pytest.param([], id="online-to-offline"),
        pytest.param([presence("ana", Presence.AWAY, 5)], id="away-then-offline"),
    ],
)
def test_agent_going_offline_moves_conversations_to_teammates_or_back_to_the_queue(before_offline: list[Any]) -> None:
    state = given(
        online("ana", "ben")
        + [presence("std-1", Presence.ONLINE, -50)]  # not of this pool: never a destination
        + pinned("ana", "a1", "a2", minute=1)
        + pinned("ben", "b1", minute=3)
        + before_offline
    )
    assert loads(state) == {"ana": 2.0, "ben": 1.0, "cy": 0.0}  # away keeps their conversations
    outputs = apply(state, presence("ana", Presence.OFFLINE, 10))
    assert routed(outputs) == [
        ("a1", "ben", OFFLINE, HOME, None),  # the older one first, to the teammate with room
        ("a2", None, QUEUED, HOME, 1),  # nobody else has room: back to the queue
    ]
    assert all(o.payload.team_id == "west" and o.payload.pool is PoolKind.HOME_TEAM for o in outputs)
    assert loads(state) == {"ana": 0.0, "ben": 2.0, "cy": 0.0}
    # The queued one is picked up by the next teammate who comes online.
    assert routed(apply(state, presence("cy", Presence.ONLINE, 11))) == [("a2", "cy", LEAST, HOME, None)]


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(presence("ana", Presence.ONLINE, 10), id="online-again"),
        pytest.param(presence("ana", Presence.AWAY, 10), id="away"),
        pytest.param(presence("cy", Presence.OFFLINE, 10), id="offline-agent-offline-again"),
    ],
)
def test_presence_changes_that_move_nothing(command: SetAgentPresence) -> None:
    state = given(online("ana", "ben") + pinned("ana", "a1", "a2"))
    assert apply(state, command) == []
    assert loads(state) == {"ana": 2.0, "ben": 0.0, "cy": 0.0}


# --- async-aware weights ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("queued", "changes", "expected_after_each"),
    [
        pytest.param(
            route("q1", 1),
            [reweigh("a1", WaitingOn.CUSTOMER, 5), reweigh("a2", WaitingOn.CUSTOMER, 6)],
            [[], [("q1", "ana", LEAST, HOME, None)]],
            id="full-weight-waits-for-two-halves",
        ),
        pytest.param(
            route("q1", 1, waiting_on=WaitingOn.CUSTOMER),
            [reweigh("a1", WaitingOn.CUSTOMER, 5)],
            [[("q1", "ana", LEAST, HOME, None)]],
            id="half-weight-fits-in-a-freed-half",
        ),
        pytest.param(
            route("q1", 1, waiting_on=WaitingOn.CUSTOMER),
            [reweigh("a1", WaitingOn.AGENT, 5), reweigh("q1", WaitingOn.AGENT, 6)],
            [[], []],
            id="unchanged-or-queued-weight-frees-nothing",
        ),
    ],
)
def test_change_weight_to_customer_frees_room_and_drains_the_queue(
    queued: RouteConversation, changes: list[ChangeConversationWeight], expected_after_each: list[list[Any]]
) -> None:
    state = given(online("ana") + pinned("ana", "a1", "a2") + [queued])
    assert holder(state, "q1") is None
    assert [routed(apply(state, change, f"change-{i}")) for i, change in enumerate(changes)] == expected_after_each


def test_change_weight_back_to_agent_overloads_but_moves_nothing() -> None:
    state = given(online("ana") + pinned("ana", "a1") + pinned("ana", "a2", minute=-5, waiting_on=WaitingOn.CUSTOMER))
    assert loads(state)["ana"] == 1.5
    assert apply(state, reweigh("a2", WaitingOn.AGENT, 5)) == []
    assert loads(state)["ana"] == 2.0
    assert holder(state, "a2") == "ana"


# --- transfers --------------------------------------------------------------------------------


def test_move_to_teammate_moves_the_load() -> None:
    state = given(online("ana", "ben") + pinned("ana", "a1", "a2") + pinned("ben", "b1", minute=-5))
    assert routed(apply(state, move("a1", "ben", 10))) == [("a1", "ben", TRANSFER, HOME, None)]
    assert holder(state, "a1") == "ben"
    assert loads(state) == {"ana": 1.0, "ben": 2.0, "cy": 0.0}


def test_move_to_teammate_gives_the_freed_room_to_the_queue() -> None:
    # ana 1.5 of 2 and cy 2.5 of 3: half a slot each, so the full-weight q1 waits.
    state = given(
        online("ana", "ben", "cy")
        + pinned("ana", "a1", minute=-30)
        + pinned("ana", "a2", minute=-29, waiting_on=WaitingOn.CUSTOMER)
        + pinned("ben", "b1", "b2", minute=-25)
        + pinned("cy", "c1", "c2", minute=-20)
        + pinned("cy", "c3", minute=-15, waiting_on=WaitingOn.CUSTOMER)
        + [route("q1", 1)]
    )
    assert holder(state, "q1") is None
    assert routed(apply(state, move("a2", "cy", 10))) == [
        ("a2", "cy", TRANSFER, HOME, None),
        ("q1", "ana", LEAST, HOME, None),  # ana now has a whole slot free
    ]
    assert loads(state) == {"ana": 2.0, "ben": 2.0, "cy": 3.0}


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        pytest.param(move("a1", "e-dan", 10), "outside_team", id="agent-of-another-team"),
        pytest.param(move("a1", "std-1", 10), "outside_team", id="standard-pool-agent"),
        pytest.param(move("a1", "ghost", 10), "agent_unknown", id="unknown-agent"),
        pytest.param(move("a1", "cy", 10), "agent_unavailable", id="offline-teammate"),
        pytest.param(move("a1", "ben", 10), "agent_at_capacity", id="full-teammate"),
        pytest.param(move("a1", "ana", 10), "already_assigned", id="to-the-same-agent"),
        pytest.param(move("elsewhere", "ben", 10), "not_in_pool", id="conversation-not-in-pool"),
    ],
)
def test_move_to_teammate_refused_with_a_reason(command: MoveToTeammate, reason: str) -> None:
    state = given(online("ana", "ben", "e-dan", "std-1") + pinned("ana", "a1") + pinned("ben", "b1", "b2", minute=-5))
    outputs = apply(state, command)
    assert outputs == [
        Decision(
            command.customer_id,
            TransferRefused(
                decision_id=derived_id("input-under-test", "0"),
                conversation_id=command.conversation_id,
                customer_id=command.customer_id,
                from_agent_id=command.from_agent_id,
                to_agent_id=command.to_agent_id,
                reason=reason,
                decided_at=command.requested_at,
            ),
        )
    ]
    assert holder(state, "a1") == "ana"
    assert loads(state) == {"ana": 1.0, "ben": 2.0, "cy": 0.0}


# --- surge ------------------------------------------------------------------------------------

# The queue is at max_queue_depth (3). ana has a conversation waiting on her (1.0) and one waiting
# on the customer (0.5): room for half a slot, which no queued (full-weight) conversation fits.
AT_MAX_DEPTH = (
    online("ana", "ben")
    + pinned("ana", "a1", minute=-20)
    + pinned("ana", "a2", minute=-19, waiting_on=WaitingOn.CUSTOMER)
    + pinned("ben", "b1", "b2", minute=-15)
    + [route("q1", 1), route("q2", 2), route("q3", 3)]
)
HALF = {"waiting_on": WaitingOn.CUSTOMER}


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        pytest.param(route("new", 4, **HALF), "surge", id="new-customer-overflows"),
        pytest.param(
            route("new", 4, known_agent_id="ana", known_agent_served_at=at(-10 * 24 * 60), **HALF),
            ("ana", KNOWN),
            id="known-agent-with-room-keeps-them-home",
        ),
        pytest.param(
            route("new", 4, current_agent_id="ana", **HALF),
            ("ana", CURRENT),
            id="current-agent-with-room-keeps-them-home",
        ),
        pytest.param(
            route("new", 4, known_agent_id="ana", known_agent_served_at=at(-31 * 24 * 60), **HALF),
            "surge",
            id="known-agent-outside-window-overflows",
        ),
        pytest.param(
            route("new", 4, known_agent_id="ben", known_agent_served_at=at(-60), **HALF),
            "surge",
            id="known-agent-without-room-overflows",
        ),
        pytest.param(
            route("new", 4, known_agent_id="ana", known_agent_served_at=at(-60)),
            "surge",
            id="known-agent-without-room-for-a-full-weight-overflows",
        ),
        pytest.param(
            route("new", 4, known_agent_id="cy", known_agent_served_at=at(-60), **HALF),
            "surge",
            id="known-agent-offline-overflows",
        ),
    ],
)
def test_surge_at_max_queue_depth_overflows_unless_their_agent_has_room(
    command: RouteConversation, expected: str | tuple[str, RoutingReason]
) -> None:
    state = given(AT_MAX_DEPTH)
    assert len(state.queue()) == 3
    outputs = apply(state, command)
    if expected == "surge":
        assert outputs == [
            Handoff("standard", command.model_copy(update={"forced_pool": STANDARD, "forced_reason": RoutingReason.SURGE}))
        ]
        assert "new" not in state.placements
    else:
        assert routed(outputs) == [("new", *expected, HOME, None)]


def test_below_max_queue_depth_a_new_conversation_waits_at_home() -> None:
    state = given(AT_MAX_DEPTH[:-1])
    assert routed(apply(state, route("new", 4))) == [("new", None, QUEUED, HOME, 3)]


@pytest.mark.parametrize(
    ("minute", "expected"),
    [
        pytest.param(9.9, "queued", id="oldest-wait-just-under-10-minutes"),
        pytest.param(10, "surge", id="oldest-wait-10-minutes"),
    ],
)
def test_surge_by_oldest_wait_counts_the_longest_waiting_not_the_queue_head(minute: float, expected: str) -> None:
    # q-old has waited since minute 0; q-vip (priority 9, since minute 5) is at the head.
    state = given(online("ana") + pinned("ana", "a1", "a2") + [route("q-old", 0), route("q-vip", 5, priority=9)])
    assert [p.conversation_id for p in state.queue()] == ["q-vip", "q-old"]
    outputs = apply(state, route("new", minute))
    if expected == "surge":
        assert [type(o) for o in outputs] == [Handoff]
        assert outputs[0].payload.forced_reason is RoutingReason.SURGE
    else:
        assert routed(outputs) == [("new", None, QUEUED, HOME, 3)]


# --- determinism ------------------------------------------------------------------------------

SCRIPT: list[Any] = [
    *online("ana", "ben"),
    route("c1", 0),
    route("c2", 1, known_agent_id="ana", known_agent_served_at=at(-60)),
    route("c3", 2),
    route("c4", 3),
    route("c5", 4, priority=2),
    route("c6", 5, when=AFTER_HOURS),
    route("c7", 6, opted_out=True),
    reweigh("c1", WaitingOn.CUSTOMER, 7),
    move("c2", "ben", 8),
    presence("cy", Presence.ONLINE, 9),
    release("c3", 10),
    presence("ana", Presence.OFFLINE, 11),
    route("c8", 12),
]


def test_same_commands_with_same_input_ids_give_identical_outputs() -> None:
    first, second = PoolState("west"), PoolState("west")
    run_one = apply_all(first, SCRIPT)
    run_two = apply_all(second, SCRIPT)
    assert run_one == run_two
    assert first.placements == second.placements
    decisions = [o.payload for outputs in run_one for o in outputs if isinstance(o, Decision)]
    assert len(decisions) >= 10
    ids = [d.decision_id for d in decisions]
    assert len(set(ids)) == len(ids)  # every decision has its own id ...
    # ... derived from the input and its place in that input's outputs.
    assert run_one[2][0].payload.decision_id == derived_id("in-west-2", "0")
    # Other input ids give other output ids for the same decisions.
    third = apply_all(PoolState("west"), SCRIPT, prefix="replayed-elsewhere")
    assert [len(o) for o in third] == [len(o) for o in run_one]
    assert all(
        a.payload.decision_id != b.payload.decision_id
        for x, y in zip(run_one, third, strict=True)
        for a, b in zip(x, y, strict=True)
        if isinstance(a, Decision)
    )


# --- response target, team hours, surge recall -------------------------------------------------


def offer(conversation: str, agent: str, minute: float) -> OfferToTeammate:
    return OfferToTeammate(request_id=f"offer-{conversation}", conversation_id=conversation, customer_id=f"cust-{conversation}", agent_id=agent, due_at=at(minute))


def test_missed_response_target_moves_the_conversation_to_a_teammate_with_room() -> None:
    state = given([*online("ana", "ben"), *pinned("ana", "c1")])
    outputs = apply(state, offer("c1", "ana", 5))
    assert [(r[0], r[1], r[2]) for r in routed(outputs)] == [("c1", "ben", RoutingReason.RESPONSE_TARGET_MISSED)]
    assert holder(state, "c1") == "ben"


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(lambda: given([*online("ana"), *pinned("ana", "c1")]), id="nobody-else-online"),
        pytest.param(lambda: given([*online("ana", "ben"), *pinned("ana", "c1"), reweigh("c1", WaitingOn.CUSTOMER, 1)]), id="agent-already-answered"),
        pytest.param(lambda: given([*online("ana", "ben"), *pinned("ben", "c1")]), id="someone-else-holds-it"),
    ],
)
def test_missed_response_target_changes_nothing_when_it_cannot_or_need_not(setup: Any) -> None:
    state = setup()
    before = holder(state, "c1")
    assert without_surge_recall(apply(state, offer("c1", "ana", 5))) == []
    assert holder(state, "c1") == before


def test_team_closing_moves_only_waiting_conversations_to_the_standard_pool() -> None:
    state = given(FULL_WITH_QUEUE)
    waiting = [p.conversation_id for p in state.queue()]
    assigned_before = {c: p.agent_id for c, p in state.placements.items() if p.agent_id}
    outputs = apply(state, MoveWaitingToStandard(request_id="close", team_id="west", at=at(600)))
    handoffs = [o for o in outputs if isinstance(o, Handoff) and isinstance(o.payload, RouteConversation)]
    assert [h.pool_id for h in handoffs] == [STANDARD_POOL_ID] * len(waiting)
    assert [h.payload.conversation_id for h in handoffs] == waiting
    assert {(h.payload.forced_pool, h.payload.forced_reason) for h in handoffs} == {(PoolKind.STANDARD, RoutingReason.AFTER_HOURS)}
    assert state.queue() == []
    assert {c: p.agent_id for c, p in state.placements.items()} == assigned_before


def test_team_opening_calls_back_its_after_hours_and_surge_conversations_but_not_opt_outs() -> None:
    standard = PoolState(pool_id=STANDARD_POOL_ID)
    for conversation, reason, home in (
        ("after", RoutingReason.AFTER_HOURS, "west"),
        ("surged", RoutingReason.SURGE, "west"),
        ("optout", RoutingReason.OPT_OUT, "west"),
        ("other-team", RoutingReason.AFTER_HOURS, "east"),
    ):
        command = route(conversation, 0, forced_pool=PoolKind.STANDARD, forced_reason=reason)
        apply(standard, command.model_copy(update={"home_team_id": home}))
    outputs = apply(standard, ReturnWaitingHome(request_id="open", team_id="west", at=at(60)))
    returned = [(o.pool_id, o.payload.conversation_id, o.payload.forced_reason) for o in outputs if isinstance(o, Handoff)]
    assert returned == [("west", "after", RoutingReason.RETURNED_HOME), ("west", "surged", RoutingReason.RETURNED_HOME)]
    assert sorted(p.conversation_id for p in standard.queue()) == ["optout", "other-team"]


def test_surge_clears_at_half_its_thresholds_and_recalls_overflowed_conversations_once() -> None:
    state = given(FULL_WITH_QUEUE)  # queue 3, threshold 3
    assert state.surging
    # Queue 2: below the threshold but above half of it: still a surge (no flapping).
    assert [o for o in apply(state, release("q-old", 4)) if isinstance(o, Handoff)] == []
    assert state.surging
    # Queue 1 (half of 3, rounded down) and the oldest wait (q-vip, 2 min) under half of 10 min.
    outputs = apply(state, release("q-new", 5))
    recalls = [o for o in outputs if isinstance(o, Handoff) and isinstance(o.payload, ReturnWaitingHome)]
    assert [(r.pool_id, r.payload.team_id) for r in recalls] == [(STANDARD_POOL_ID, "west")]
    assert not state.surging
    assert [o for o in apply(state, release("q-vip", 12)) if isinstance(o, Handoff)] == []


def test_loads_and_queue_follow_a_long_random_run_without_rebuilding() -> None:
    """Random routes, releases, weight changes, transfers and presence changes: the counts the
    pool keeps (checked after every command by the fixture above) never drift."""
    import random

    rng = random.Random(11)
    state = given(online("ana", "ben", "cy"))
    open_: list[str] = []
    for n in range(600):
        minute = n / 10
        roll = rng.random()
        if roll < 0.4 or not open_:
            conv = f"r{n}"
            open_.append(conv)
            apply(state, route(conv, minute, priority=rng.choice([0, 0, 1])), f"in-{n}")
        elif roll < 0.6:
            apply(state, release(open_.pop(rng.randrange(len(open_))), minute), f"in-{n}")
        elif roll < 0.75:
            apply(state, reweigh(rng.choice(open_), rng.choice(list(WaitingOn)), minute), f"in-{n}")
        elif roll < 0.9:
            apply(state, move(rng.choice(open_), rng.choice(["ana", "ben", "cy"]), minute), f"in-{n}")
        else:
            agent = rng.choice(["ana", "ben", "cy"])
            apply(state, presence(agent, rng.choice([Presence.ONLINE, Presence.OFFLINE]), minute), f"in-{n}")
    assert state.placements and state.held  # the run did hold conversations


def test_agent_views_follow_a_reloaded_directory() -> None:
    """The views a pool keeps are rebuilt for another directory (a reload: other capacities,
    agents added or gone), and the caller's copy is its own."""
    state = given(online("ana", "ben", "cy"))
    apply(state, route("c1", 1))
    before = state.agent_views(DIRECTORY)
    before["ana"] = None  # type: ignore[assignment]  # a caller's change stays in its copy
    assert state.agent_views(DIRECTORY)["ana"] is not None
    raw = {
        **DIRECTORY_SOURCE,
        "teams": [
            {**DIRECTORY_SOURCE["teams"][0], "agents": [{"id": "ana", "max_concurrency": 5}, {"id": "dee", "max_concurrency": 1}]},
            DIRECTORY_SOURCE["teams"][1],
        ],
    }
    reloaded = parse_directory(raw)
    views = state.agent_views(reloaded)
    assert sorted(views) == ["ana", "dee"]
    assert (views["ana"].max_concurrency, views["ana"].load, views["ana"].online) == (5, 1.0, True)
    assert (views["dee"].online, views["dee"].load) == (False, 0.0)
    assert state.agent_views(DIRECTORY)["cy"].max_concurrency == 3  # and back
