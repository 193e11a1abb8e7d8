"""Micro-benchmark of the routing decision, in one process, no I/O.

    python -m bench.routing_decision [--agents 35] [--decisions 50000] [--repeats 7]

Two figures, each the best and the median of several repeats (time.perf_counter):

- **decision**: ``choose_pool`` + ``choose_agent`` (services/team_routing/decision.py) over a
  team of ``--agents`` agents with realistic, varying loads; a third of the customers have a
  known agent (in the relationship window), a few are opted out. This is the pure rule.
- **route**: the whole ``apply_command(RouteConversation)`` transition of
  services/team_routing/pool.py on a home team's pool that already holds conversations
  (the agent views the pool keeps, the agents whose load changed rebuilt, surge check,
  queue, placement, decision object, surge bookkeeping); each placed conversation is released again outside the transition, so
  the pool stays the same size. This is what team-routing does per command between the
  store load and the publish.

Commands are built before timing; only the decisions are timed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

EVERY_DAY = {d: ["00:00-24:00"] for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}
NOW = datetime(2026, 11, 23, 18, 0, tzinfo=UTC)


def team_directory(agents: int) -> Any:
    from shared.teams import parse_directory

    return parse_directory(
        {
            "default_team": "home",
            "standard_pool": {"agents": [{"id": f"std-{n}", "max_concurrency": 8} for n in range(10)]},
            "teams": [
                {
                    "id": "home",
                    "name": "Home team",
                    "timezone": "America/Chicago",
                    "regions": {"area_codes": ["312"]},
                    "hours": EVERY_DAY,
                    "surge": {"max_queue_depth": 25, "max_oldest_wait_seconds": 900},
                    # A real team mixes 4-, 6- and 8-slot agents.
                    "agents": [{"id": f"agent-{n:02d}", "max_concurrency": (4, 6, 8)[n % 3]} for n in range(agents)],
                }
            ],
        }
    )


def as_received(at: datetime) -> datetime:
    """``at`` as team-routing holds an agent's idle time: parsed from a presence event's JSON,
    so with pydantic's ``TzInfo``, one object per parsed time (aware datetimes of different
    tzinfo objects compare through ``utcoffset`` calls: ``AgentView.idle_at``)."""
    from pydantic import AwareDatetime, TypeAdapter

    return TypeAdapter(AwareDatetime).validate_json(json.dumps(at.isoformat()))  # type: ignore[no-any-return]


def timed(fn: Callable[[], int], repeats: int) -> dict[str, float]:
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - started))
    return {"best": max(rates), "median": statistics.median(rates), "worst": min(rates)}


def bench_decision(agents: int, decisions: int, repeats: int, seed: int) -> dict[str, float]:
    from services.team_routing.decision import AgentView, choose_agent, choose_pool, is_surging, known_agent_in_window

    rng = random.Random(seed)
    ids = [f"agent-{n:02d}" for n in range(agents)]
    views = {
        a: AgentView(
            agent_id=a,
            online=rng.random() < 0.9,
            load=rng.choice((0, 0.5, 1, 1.5, 2, 3, 4, 5)),
            max_concurrency=(4, 6, 8)[n % 3],
            idle_since=as_received(NOW - timedelta(seconds=rng.randrange(3600))),
        )
        for n, a in enumerate(ids)
    }
    window = timedelta(days=30)
    cases = [
        (
            rng.random() < 0.03,  # opted out
            rng.choice(ids) if rng.random() < 0.33 else None,  # known agent
            NOW - timedelta(days=rng.randrange(60)),
            rng.randrange(40),  # queue depth
        )
        for _ in range(decisions)
    ]

    def run() -> int:
        for opted_out, known, served_at, depth in cases:
            known_ok = known_agent_in_window(known, served_at, NOW, window)
            surging = is_surging(depth, None, 25, timedelta(seconds=900))
            can_take = known_ok is not None and views[known_ok].has_room(1.0)
            choose_pool(opted_out=opted_out, team_open=True, surging=surging, agent_can_take_home=can_take)
            choose_agent(views, weight=1.0, known_agent_id=known_ok)
        return len(cases)

    return timed(run, repeats)


def bench_route(agents: int, decisions: int, repeats: int, seed: int, open_conversations: int) -> dict[str, float]:
    from services.team_routing.pool import AgentPresenceState, Placement, PoolState, apply_command
    from shared.contracts.agents import Presence
    from shared.contracts.common import Channel, RoutingReason, WaitingOn
    from shared.contracts.routing import RouteConversation

    rng = random.Random(seed)
    directory = team_directory(agents)
    ids = [a.id for a in directory.team("home").agents]  # type: ignore[union-attr]
    state = PoolState(pool_id="home")
    for a in ids:
        state.agents[a] = AgentPresenceState(presence=Presence.ONLINE, idle_since=as_received(NOW - timedelta(seconds=rng.randrange(3600))))
    # The pool already holds conversations: assigned ones spread over the agents, and a short queue.
    for n in range(open_conversations):
        agent = ids[n % len(ids)] if n < open_conversations - 5 else None
        conv = f"open-{n}"
        state.add(Placement(
            conversation_id=conv,
            customer_id=f"cus-open-{n}",
            agent_id=agent,
            waiting_on=WaitingOn.CUSTOMER if rng.random() < 0.4 else WaitingOn.AGENT,
            priority=0,
            enqueued_at=NOW - timedelta(minutes=rng.randrange(120)),
            pool_reason=RoutingReason.HOME_TEAM,
            assigned_at=NOW if agent else None,
            home_team_id="home",
            channel=Channel.SMS,
        ))
    commands = [
        RouteConversation(
            request_id=str(uuid.UUID(int=rng.getrandbits(128))),
            conversation_id=f"conv-{n}",
            customer_id=f"cus-{n}",
            home_team_id="home",
            opted_out=rng.random() < 0.03,
            channel=rng.choice(list(Channel)),
            known_agent_id=rng.choice(ids) if rng.random() < 0.33 else None,
            known_agent_served_at=NOW - timedelta(days=rng.randrange(60)),
            requested_at=NOW + timedelta(milliseconds=n),
        )
        for n in range(decisions)
    ]
    input_ids = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in commands]

    def run() -> int:
        for cmd, input_id in zip(commands, input_ids, strict=True):
            apply_command(state, cmd, directory, input_id)
            state.remove(cmd.conversation_id)  # keep the pool the same size
        return len(commands)

    return timed(run, repeats)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.routing_decision", description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=35, help="agents in the team")
    p.add_argument("--decisions", type=int, default=50_000, help="decisions per repeat")
    p.add_argument("--route-decisions", type=int, default=10_000, help="route transitions per repeat")
    p.add_argument("--open-conversations", type=int, default=150, help="conversations the pool already holds")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)

    decision = bench_decision(args.agents, args.decisions, args.repeats, args.seed)
    route = bench_route(args.agents, args.route_decisions, args.repeats, args.seed, args.open_conversations)
    print(f"routing decision micro-benchmark: team of {args.agents} agents, {args.repeats} repeats (Python {sys.version.split()[0]})")
    print(f"{'what':<58}{'best/s':>12}{'median/s':>12}{'worst/s':>12}")
    print(
        f"{'choose_pool + choose_agent (pure rule)':<58}{decision['best']:>12,.0f}{decision['median']:>12,.0f}{decision['worst']:>12,.0f}"
    )
    label = f"apply_command(RouteConversation), pool of {args.open_conversations}"
    print(f"{label:<58}{route['best']:>12,.0f}{route['median']:>12,.0f}{route['worst']:>12,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
