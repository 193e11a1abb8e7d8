"""The routing decision as pure functions: which pool, which agent, when a team surges, and
whether the known agent is still within the relationship window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.team_routing.decision import (
    AgentChoice,
    AgentView,
    PoolChoice,
    choose_agent,
    choose_pool,
    is_surging,
    known_agent_in_window,
)
from shared.contracts.common import PoolKind, RoutingReason

NOW = datetime(2026, 11, 16, 18, 0, tzinfo=UTC)
HOME = PoolChoice(PoolKind.HOME_TEAM, RoutingReason.HOME_TEAM)


def std(reason: RoutingReason) -> PoolChoice:
    return PoolChoice(PoolKind.STANDARD, reason)


# --- choose_pool ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opted_out", "team_open", "surging", "agent_can_take_home", "expected"),
    [
        pytest.param(False, True, False, False, HOME, id="open-calm-goes-home"),
        pytest.param(False, True, False, True, HOME, id="open-calm-with-agent-goes-home"),
        pytest.param(True, True, False, False, std(RoutingReason.OPT_OUT), id="opt-out-while-open"),
        pytest.param(True, True, False, True, std(RoutingReason.OPT_OUT), id="opt-out-beats-known-agent"),
        pytest.param(True, False, True, True, std(RoutingReason.OPT_OUT), id="opt-out-beats-after-hours-and-surge"),
        pytest.param(False, False, False, False, std(RoutingReason.AFTER_HOURS), id="closed-goes-standard"),
        pytest.param(False, False, True, False, std(RoutingReason.AFTER_HOURS), id="after-hours-beats-surge"),
        pytest.param(False, False, False, True, std(RoutingReason.AFTER_HOURS), id="after-hours-even-with-known-agent"),
        pytest.param(False, True, True, False, std(RoutingReason.SURGE), id="surge-overflows"),
        pytest.param(False, True, True, True, HOME, id="surge-but-agent-can-take-home-stays"),
    ],
)
def test_choose_pool_order_is_opt_out_then_after_hours_then_surge_else_home(
    opted_out: bool, team_open: bool, surging: bool, agent_can_take_home: bool, expected: PoolChoice
) -> None:
    choice = choose_pool(
        opted_out=opted_out, team_open=team_open, surging=surging, agent_can_take_home=agent_can_take_home
    )
    assert choice == expected


# --- choose_agent --------------------------------------------------------------------------


def view(agent_id: str, load: float, max_concurrency: int = 4, *, online: bool = True, idle_minutes: int = 0) -> AgentView:
    """An agent idle for ``idle_minutes`` before NOW."""
    return AgentView(
        agent_id=agent_id,
        online=online,
        load=load,
        max_concurrency=max_concurrency,
        idle_since=NOW - timedelta(minutes=idle_minutes),
    )


def pool(*views: AgentView) -> dict[str, AgentView]:
    return {v.agent_id: v for v in views}


def least(agent_id: str) -> AgentChoice:
    return AgentChoice(agent_id, RoutingReason.LEAST_LOADED)


QUEUED = AgentChoice(None, RoutingReason.QUEUED)


@pytest.mark.parametrize(
    ("agents", "kwargs", "expected"),
    [
        # Current agent.
        pytest.param(
            pool(view("ana", 4, 4), view("ben", 0)),
            {"current_agent_id": "ana"},
            AgentChoice("ana", RoutingReason.CURRENT_AGENT),
            id="current-agent-kept-while-online-even-at-capacity",
        ),
        pytest.param(
            pool(view("ana", 5, 4), view("ben", 0)),
            {"current_agent_id": "ana"},
            AgentChoice("ana", RoutingReason.CURRENT_AGENT),
            id="current-agent-kept-even-over-capacity",
        ),
        pytest.param(
            pool(view("ana", 0, online=False), view("ben", 1)),
            {"current_agent_id": "ana"},
            least("ben"),
            id="current-agent-offline-is-replaced",
        ),
        pytest.param(
            pool(view("ana", 0), view("ben", 1)),
            {"current_agent_id": "ana", "exclude": ["ana"]},
            least("ben"),
            id="current-agent-excluded",
        ),
        pytest.param(
            pool(view("ana", 1), view("ben", 0)),
            {"current_agent_id": "other-team-agent"},
            least("ben"),
            id="current-agent-not-in-pool",
        ),
        pytest.param(
            pool(view("ana", 1), view("ben", 0), view("cy", 3)),
            {"current_agent_id": "ana", "known_agent_id": "cy"},
            AgentChoice("ana", RoutingReason.CURRENT_AGENT),
            id="current-agent-beats-known-agent",
        ),
        # Known agent.
        pytest.param(
            pool(view("ana", 0), view("cy", 3)),
            {"known_agent_id": "cy"},
            AgentChoice("cy", RoutingReason.KNOWN_AGENT),
            id="known-agent-with-room-beats-less-loaded",
        ),
        pytest.param(
            pool(view("ana", 1), view("cy", 4)),
            {"known_agent_id": "cy"},
            least("ana"),
            id="known-agent-at-capacity-falls-back-to-least-loaded",
        ),
        pytest.param(
            pool(view("ana", 1), view("cy", 0, online=False)),
            {"known_agent_id": "cy"},
            least("ana"),
            id="known-agent-offline-falls-back",
        ),
        pytest.param(
            pool(view("ana", 1), view("cy", 0)),
            {"known_agent_id": "cy", "exclude": ["cy"]},
            least("ana"),
            id="known-agent-excluded",
        ),
        pytest.param(
            pool(view("ana", 1), view("ben", 0)),
            {"known_agent_id": "ghost"},
            least("ben"),
            id="known-agent-not-in-pool",
        ),
        # Least loaded, by share of capacity.
        pytest.param(
            pool(view("ana", 2, 4), view("ben", 3, 8)),
            {},
            least("ben"),
            id="ratio-not-absolute-load-3-of-8-beats-2-of-4",
        ),
        pytest.param(
            pool(view("ana", 1, 4), view("ben", 0, 4), view("cy", 2, 4)),
            {},
            least("ben"),
            id="least-loaded-of-three",
        ),
        pytest.param(
            pool(view("ana", 1, 4, idle_minutes=5), view("ben", 2, 8, idle_minutes=30)),
            {},
            least("ben"),
            id="equal-ratio-longest-idle-wins",
        ),
        pytest.param(
            pool(view("ben", 1, 4, idle_minutes=10), view("ana", 1, 4, idle_minutes=10)),
            {},
            least("ana"),
            id="equal-ratio-and-idle-agent-id-wins",
        ),
        pytest.param(
            pool(view("ana", 0, 4, idle_minutes=60), view("ben", 0.5, 4, idle_minutes=0)),
            {},
            least("ana"),
            id="lower-ratio-beats-longer-idle",
        ),
        # Nobody, exclusions, offline.
        pytest.param(pool(view("ana", 4, 4), view("ben", 2, 2)), {}, QUEUED, id="everyone-full-queues"),
        pytest.param(pool(), {}, QUEUED, id="empty-pool-queues"),
        pytest.param(
            pool(view("ana", 0, online=False), view("ben", 0, online=False)),
            {},
            QUEUED,
            id="all-offline-queues",
        ),
        pytest.param(
            pool(view("ana", 0, online=False, idle_minutes=999), view("ben", 3, 4)),
            {},
            least("ben"),
            id="offline-idle-agent-never-chosen",
        ),
        pytest.param(
            pool(view("ana", 0), view("ben", 1), view("cy", 2)),
            {"exclude": ["ana"]},
            least("ben"),
            id="excluded-least-loaded-skipped",
        ),
        pytest.param(
            pool(view("ana", 0), view("ben", 4, 4)),
            {"exclude": ["ana"]},
            QUEUED,
            id="only-agent-with-room-excluded-queues",
        ),
    ],
)
def test_choose_agent(agents: dict[str, AgentView], kwargs: dict[str, object], expected: AgentChoice) -> None:
    assert choose_agent(agents, weight=1.0, **kwargs) == expected


@pytest.mark.parametrize(
    ("load", "weight", "expected"),
    [
        pytest.param(5.5, 0.5, least("ana"), id="5.5-of-6-fits-half-weight"),
        pytest.param(5.5, 1.0, QUEUED, id="5.5-of-6-does-not-fit-full-weight"),
        pytest.param(5.0, 1.0, least("ana"), id="5-of-6-fits-full-weight-exactly"),
        pytest.param(6.0, 0.5, QUEUED, id="6-of-6-fits-nothing"),
        # 14 x 0.4 sums to 5.6000000000000005 in floating point; a 15th still fits 6 slots.
        pytest.param(sum([0.4] * 14), 0.4, least("ana"), id="float-rounding-does-not-refuse-exact-fit"),
    ],
)
def test_choose_agent_room_depends_on_the_conversation_weight(load: float, weight: float, expected: AgentChoice) -> None:
    assert choose_agent(pool(view("ana", load, 6)), weight=weight) == expected


@pytest.mark.parametrize(
    ("load", "weight", "expected"),
    [
        pytest.param(5.5, 0.5, AgentChoice("cy", RoutingReason.KNOWN_AGENT), id="known-agent-room-for-half"),
        pytest.param(5.5, 1.0, least("ana"), id="known-agent-no-room-for-full"),
    ],
)
def test_known_agent_room_depends_on_the_conversation_weight(load: float, weight: float, expected: AgentChoice) -> None:
    agents = pool(view("ana", 0, 6), view("cy", load, 6))
    assert choose_agent(agents, weight=weight, known_agent_id="cy") == expected


# --- known_agent_in_window ------------------------------------------------------------------

WINDOW = timedelta(days=30)


@pytest.mark.parametrize(
    ("known", "served_at", "expected"),
    [
        pytest.param("cy", NOW - timedelta(hours=1), "cy", id="served-an-hour-ago"),
        pytest.param("cy", NOW - timedelta(days=29, hours=23), "cy", id="inside-window"),
        pytest.param("cy", NOW - WINDOW, "cy", id="exactly-at-window-edge-is-in"),
        pytest.param("cy", NOW - WINDOW - timedelta(seconds=1), None, id="one-second-past-window"),
        pytest.param("cy", NOW - timedelta(days=90), None, id="long-ago"),
        pytest.param(None, NOW - timedelta(hours=1), None, id="no-known-agent"),
        pytest.param("cy", None, None, id="no-served-at"),
    ],
)
def test_known_agent_only_within_the_relationship_window(
    known: str | None, served_at: datetime | None, expected: str | None
) -> None:
    assert known_agent_in_window(known, served_at, NOW, WINDOW) == expected


# --- is_surging ----------------------------------------------------------------------------

MAX_DEPTH, MAX_WAIT = 20, timedelta(seconds=600)


@pytest.mark.parametrize(
    ("depth", "oldest_wait", "expected"),
    [
        pytest.param(0, None, False, id="empty-queue"),
        pytest.param(19, timedelta(seconds=599), False, id="both-just-below"),
        pytest.param(20, None, True, id="depth-at-threshold"),
        pytest.param(21, timedelta(seconds=1), True, id="depth-above-threshold"),
        pytest.param(1, timedelta(seconds=600), True, id="wait-at-threshold"),
        pytest.param(1, timedelta(seconds=599, microseconds=999999), False, id="wait-just-below"),
        pytest.param(1, timedelta(hours=2), True, id="wait-far-above"),
    ],
)
def test_is_surging_at_or_above_either_threshold(depth: int, oldest_wait: timedelta | None, expected: bool) -> None:
    assert is_surging(depth, oldest_wait, MAX_DEPTH, MAX_WAIT) is expected


@pytest.mark.parametrize("seed", range(40))
def test_least_loaded_choice_matches_the_stated_order_on_random_pools(seed: int) -> None:
    """The written-out loop in ``choose_agent`` picks what sorting by the stated order picks:
    load share, then longest idle, then agent id, among online agents with room."""
    import random

    from pydantic import AwareDatetime, TypeAdapter

    parsed = TypeAdapter(AwareDatetime)
    # The same instants as the service may hold them: UTC, parsed from a record (pydantic's
    # TzInfo), in another offset. ``choose_agent`` compares ``idle_at``, the instant.
    forms = (
        lambda t: t,
        lambda t: parsed.validate_json(f'"{t.isoformat()}"'),
        lambda t: t.astimezone(timezone(timedelta(hours=2))),
    )
    rng = random.Random(seed)
    start = datetime(2026, 11, 23, 12, tzinfo=UTC)
    agents = {
        f"a{n:02d}": AgentView(
            agent_id=f"a{n:02d}",
            online=rng.random() < 0.8,
            load=rng.choice((0, 0.5, 1, 2, 3, 4, 6)),
            max_concurrency=rng.choice((2, 4, 6, 8)),
            idle_since=rng.choice(forms)(start - timedelta(minutes=rng.choice((0, 5, 10)), microseconds=rng.choice((0, 1)))),
        )
        for n in range(rng.randrange(0, 12))
    }
    weight = rng.choice((0.5, 1.0))
    exclude = {a for a in agents if rng.random() < 0.1}
    eligible = [a for a in agents.values() if a.online and a.has_room(weight) and a.agent_id not in exclude]
    eligible.sort(key=lambda a: (round(a.load / a.max_concurrency, 9), a.idle_since, a.agent_id))
    expected = (
        AgentChoice(eligible[0].agent_id, RoutingReason.LEAST_LOADED) if eligible else AgentChoice(None, RoutingReason.QUEUED)
    )
    assert choose_agent(agents, weight=weight, exclude=exclude) == expected


def test_an_agent_view_compares_by_what_it_was_made_of() -> None:
    """``idle_at`` is derived (the instant of ``idle_since``), not part of a view's identity."""
    utc = view("a", 1.0)
    other_offset = AgentView("a", True, 1.0, 4, utc.idle_since.astimezone(timezone(timedelta(hours=-5))))
    assert utc == other_offset and utc.idle_at == other_offset.idle_at == utc.idle_since.timestamp()
