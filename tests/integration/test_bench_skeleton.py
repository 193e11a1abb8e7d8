"""The skeleton benchmark against the real broker: five stand-in processes move a preloaded
inbound topic through the services' topics in the measured shape, each reads exactly what
the shape sends it, and every topic ends with the records the shape expects."""

from __future__ import annotations

import pydantic_core
import pytest

from bench.pipeline import RunIds, delete_run_topics
from bench.skeleton import COMMANDS, EVENTS, INBOUND, STAGES, Shape, make_plan, run_pass


@pytest.mark.parametrize("parse", [False, True], ids=["bytes", "parsed"])
async def test_a_pass_moves_every_record_through_the_five_stand_ins(infra, parse: bool) -> None:
    ids = RunIds.new("skeltest")
    plan = make_plan(3_000, seed=3, tag=ids.run)
    shape = Shape()
    try:
        result = await run_pass(infra.kafka, ids, 0, plan.bodies, plan.keys, shape, batch_max_records=500, timeout_s=120, parse=parse)
    finally:
        await delete_run_topics(infra.kafka, ids.prefix)
    # Parsed, the inbound bodies are preloaded re-serialised: the same messages, other bytes.
    bodies = [pydantic_core.to_json(pydantic_core.from_json(b)) for b in plan.bodies] if parse else plan.bodies
    expected = shape.expected(bodies)
    assert result["complete"]
    assert {s: r["read"] for s, r in result["stages"].items()} == expected["read"]
    assert result["written"] == expected["written"]
    assert result["written"][INBOUND] == len(plan.bodies)
    assert 0 < result["written"][COMMANDS] < result["written"][EVENTS]
    # Each stand-in wrote what the next ones read: nothing lost or doubled on the way.
    assert sum(r["written"] for r in result["stages"].values()) == sum(v for t, v in expected["written"].items() if t != INBOUND)
    assert result["rate"] and result["rate"] > 0 and set(result["stages"]) == set(STAGES)
