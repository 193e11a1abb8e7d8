"""The pipeline benchmark's per-message costs: CPU, Kafka records and store writes of a step,
divided by the messages it completed; and whether its write-behind states keep up."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bench.pipeline import at_or_before, message_costs, process_uptime_s, unstored_verdict


def test_costs_are_the_step_deltas_per_message() -> None:
    costs = message_costs(
        100,
        {"ingest": {"cpu_seconds": 0.05}, "conversation_state": {"cpu_seconds": 0.1}, "kafka": {"cpu_seconds": 0.02},
         "ferretdb": {"cpu_seconds": 0.08}, "bench": {"cpu_seconds": 1.0}},
        ({"channel.inbound.v1": 1000, "messages.received.v1": 40}, {"channel.inbound.v1": 1100, "messages.received.v1": 140}),
        ({"ingest": 1000, "conversation-state": 40}, {"ingest": 1100, "conversation-state": 190}),
        {"conversation_state": (
            {("written", "customers", "update"): 10.0, ("commands", "customers", "update"): 2.0},
            {("written", "customers", "update"): 60.0, ("commands", "customers", "update"): 7.0,
             ("written", "messages", "insert"): 100.0, ("commands", "messages", "find"): 3.0},
        )},
        "channel.inbound.v1",
    )
    assert costs["cpu_ms"]["ingest"] == pytest.approx(0.5)
    assert costs["cpu_ms_services"] == pytest.approx(1.5)  # the bench's own CPU is not the pipeline's
    assert costs["cpu_ms_total"] == pytest.approx(1.5 + 0.2 + 0.8)
    # What the bench itself sent is not a record the pipeline produced.
    assert costs["records_produced"] == {"messages.received.v1": 1.0}
    assert costs["records_consumed"] == {"ingest": 1.0, "conversation-state": 1.5}
    assert costs["store_documents_written"] == {"conversation_state/customers/update": 0.5, "conversation_state/messages/insert": 1.0}
    assert costs["store_written_by_command"] == {"update": 0.5, "insert": 1.0}
    assert costs["store_reads"] == pytest.approx(0.03)


def test_a_step_that_completed_nothing_has_no_costs() -> None:
    assert message_costs(0, {}, ({}, {}), ({}, {}), {}, "channel.inbound.v1") == {}


@pytest.mark.parametrize(
    ("t", "expected"),
    [(0.5, {"a": 1}), (1.0, {"a": 1}), (2.5, {"a": 2}), (9.0, {"a": 3})],
)
def test_at_or_before_takes_the_last_sample_not_after_t(t: float, expected: dict) -> None:
    assert at_or_before([(1.0, {"a": 1}), (2.0, {"a": 2}), (3.0, {"a": 3})], t) == expected


def _series(values: Callable[[float], float], seconds: float = 20.0, state: str = "metrics/kpi_events") -> list[tuple[float, dict[str, float]]]:
    return [(t / 2, {state: values(t / 2)}) for t in range(int(seconds * 2) + 1)]


def _saw(rate: float, period: float, ramp: bool = True) -> Callable[[float], float]:
    """Unstored records of a write-behind state storing every ``period`` seconds: rising at
    ``rate`` and back to zero at each flush (from nothing at the start of the step)."""
    return lambda t: rate * (t % period) if ramp or t >= period else rate * t


@pytest.mark.parametrize(
    ("name", "values", "bounded"),
    [
        ("flat", lambda t: 300.0, True),
        ("5 s saw tooth of 2.6 events per message at 200 msg/s, filling up from nothing", _saw(520, 5.0), True),
        ("1 s saw tooth at 1,000 msg/s", _saw(1000, 1.0), True),
        ("a level reached in the first third", lambda t: min(t, 5.0) * 800, True),
        ("growing by 200 records a second", lambda t: 200 + 200 * t, False),
        ("growing by half the input rate", lambda t: 500 * t, False),
        ("saw tooth on a growing base", lambda t: 150 * t + 520 * (t % 5.0), False),
    ],
)
def test_write_behind_keeps_up_unless_what_it_holds_grows(name: str, values: Callable[[float], float], bounded: bool) -> None:
    verdict = unstored_verdict(_series(values), 0.0, 20.0, rate=200.0)
    assert verdict["bounded"] is bounded, (name, verdict)
    assert verdict["states"]["metrics/kpi_events"]["bounded"] is bounded


def test_too_few_samples_say_nothing_against_the_step() -> None:
    assert unstored_verdict(_series(lambda t: 1e6 * t, seconds=2.0), 0.0, 2.0, rate=200.0) == {"states": {}, "bounded": True}


def test_a_share_of_a_steps_messages_come_from_customers_new_to_the_run() -> None:
    from bench.pipeline import FRESH_PER_STEP, fresh_base, make_population, plan_messages

    population = make_population(500, 4, seed=7)
    plans = [
        plan_messages(population, rate=400, duration=5, seed=100 + step, tag=f"s{step}", new_share=0.1,
                      first_new=fresh_base(len(population), step), teams=4, population_seed=7)
        for step in range(2)
    ]
    known = {(c.channel, c.address) for c in population}
    seen: set[int] = set()
    for step, plan in enumerate(plans):
        fresh = [i for i in plan.customers if i >= len(population)]
        assert 0.07 * len(plan.customers) < len(fresh) and plan.new_customers == len(set(fresh))
        first = fresh_base(len(population), step)
        assert all(first <= i < first + FRESH_PER_STEP for i in fresh)
        assert not set(fresh) & seen  # new to the whole run, not only to the step
        seen |= set(fresh)
    # A new customer's address is none of the population's (ingest would know them otherwise).
    bodies = [b for p in plans for b, i in zip(p.bodies, p.customers, strict=True) if i >= len(population)]
    import json

    addresses = {(json.loads(b)["data"]["channel"], json.loads(b)["data"]["address"]) for b in bodies}
    assert addresses and not addresses & known
    # Without a share, every message comes from the population.
    assert max(plan_messages(population, rate=400, duration=2, seed=1, tag="x").customers) < len(population)


def test_the_generator_plans_bench_memorys_load_which_has_no_new_customers() -> None:
    from bench.pipeline import plan_of

    # bench.memory's spec (bench/memory.py) has no new-customer keys: its load is the known customers.
    spec = {"customers": 300, "teams": 4, "seed": 3, "step_seed": 3001, "tag": "mem", "rate": 100, "duration": 2, "skew": 1.0}
    plan = plan_of(spec)
    assert plan.offsets and plan.new_customers == 0 and max(plan.customers) < 300
    fresh = plan_of({**spec, "new_share": 0.5, "first_new": 1_000})
    assert fresh.new_customers > 0 and min(i for i in fresh.customers if i >= 300) >= 1_000


@pytest.mark.parametrize(
    ("rates", "text"),
    [
        (None, "1 pass"),  # a result written before the baseline had passes
        ([37_004.2, 57_702.0], "2 passes: 37,004 / 57,702 msg/s"),
        ([None, 5.0], "2 passes: - / 5 msg/s"),
    ],
)
def test_the_baseline_line_names_every_pass(rates: list[float | None] | None, text: str) -> None:
    from bench.pipeline import _rates

    assert _rates(rates) == text


def test_a_process_uptime_is_read_from_its_start_time() -> None:
    """The report says how long the stack's processes have run (a cold broker skews a run)."""
    import os
    import subprocess
    import time

    child = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(1.2)
        mine, childs = process_uptime_s(os.getpid()), process_uptime_s(child.pid)
        assert mine is not None and childs is not None
        assert 0.9 <= childs <= 10 and mine >= childs
    finally:
        child.kill()
        child.wait()
    assert process_uptime_s(child.pid) is None


def test_a_decision_splits_into_its_hops_by_each_outputs_create_time() -> None:
    from bench.pipeline import Collector

    c = Collector("127.0.0.1:9", "x.")
    c.received = {"m1": 10.040, "m2": 20.050, "m3": 30.0}
    c.commanded = {"c1": 10.100, "c2": 20.300}
    c.decisions = {"c1": (10.130, 10.000), "c2": (20.310, 20.000)}
    # m3's conversation got no decision yet; m4 never reached ingest's output.
    hops = c.decision_hops(["m1", "m2", "m3", "m4"], {"m1": "c1", "m2": "c2", "m3": "c3", "m4": "c1"})
    assert hops["ingest"] == pytest.approx([0.040, 0.050])
    assert hops["conversation_state"] == pytest.approx([0.060, 0.250])
    assert hops["team_routing"] == pytest.approx([0.030, 0.010])


def test_the_collector_finds_the_message_id_in_ingests_output() -> None:
    from bench.pipeline import MESSAGE_ID

    from shared.contracts.envelope import Envelope
    from shared.contracts.messages import CustomerMessageReceived

    raw = (Path(__file__).resolve().parents[2] / "shared/contracts/examples/v1/CustomerMessageReceived.json").read_bytes()
    published = Envelope[CustomerMessageReceived].model_validate_json(raw).model_dump_json().encode()  # as the outbox sends it
    for value in (raw, published):
        found = MESSAGE_ID.search(value)
        assert found is not None and found.group(1) == b"0f9e8d7c-6b5a-5c4d-8e3f-2a1b0c9d8e7f"


@pytest.mark.parametrize(
    ("times", "silence"),
    [
        ([float(t) for t in range(101, 120)], 1.0),  # a sample every second
        ([101.0, 102.0, *(float(t) for t in range(115, 120))], 13.0),  # the broker did not answer for 13 s
        ([], 20.0),  # nothing at all in the step
        ([95.0, 100.5, 130.0], 19.5),  # samples outside the step do not count; its edges do
    ],
)
def test_a_step_reports_the_longest_time_the_broker_left_the_lag_sampler_unanswered(times: list[float], silence: float) -> None:
    from bench.pipeline import longest_silence

    assert longest_silence(times, 100.0, 120.0) == pytest.approx(silence)


def test_every_step_of_a_run_has_new_customers_of_its_own() -> None:
    """The warm-up (0), the sweep (1..rates), the half-rate step (rates + 2) and the refining
    steps give their new customers disjoint ranges of numbers (the refining steps once shared
    one, so the second one's "new" customers were returning ones)."""
    from bench.pipeline import FRESH_PER_STEP, MAX_CUSTOMERS, fresh_base, parse_args, refining_step

    args = parse_args([])
    rates = len(args.rates)
    steps = [0, *range(1, rates + 1), rates + 2, *(refining_step(rates, k) for k in range(args.refine))]
    assert len(set(steps)) == len(steps)
    starts = sorted(fresh_base(args.customers, s) for s in steps)
    assert starts[0] >= args.customers
    assert all(b - a >= FRESH_PER_STEP for a, b in zip(starts, starts[1:], strict=False))
    assert starts[-1] + FRESH_PER_STEP <= MAX_CUSTOMERS
    with pytest.raises(ValueError):
        fresh_base(args.customers, (MAX_CUSTOMERS - args.customers) // FRESH_PER_STEP)
