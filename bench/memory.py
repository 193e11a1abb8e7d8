"""Resident memory of each service with many known customers.

    python -m bench.memory [--customers 1000000] [--rate 700] [--duration 90]

1. seeds the store: for each customer an identity in ingest's ``identities`` collection
   (``{_id: "<channel>:<address>", customer_id}``) and a customer document in
   conversation-state's ``customers`` collection (``Customer.to_doc()`` of
   services/conversation_state/model.py, stored compact as the service stores it: home team from the address, a known agent for a
   third of them, and since 2026-12-05 what a customer who wrote before carries whatever its
   age: 64 recent inputs, up to 50 reply gaps, applied offsets; ``--no-history`` seeds them as
   new, as before, which understated conversation-state's memory by more than half), with
   insert_many in batches of 10,000. The seeding rate is measured on the
   first ``--probe`` customers; if seeding them all would take longer than
   ``--max-seed-seconds``, the count is lowered to what fits and the report says so;
2. starts the five services (databases of their own, as in bench.pipeline), brings the agents
   online and sends ``--rate`` messages/s for ``--duration`` s from customers drawn uniformly
   from the known ones (each lookup misses ingest's identity cache at first). The default
   load (63,000 messages, ~61,000 distinct customers) meets more customers than
   conversation-state keeps in memory (``STATE_CACHE_CUSTOMERS``, 20,000) and is faster than
   the store takes their rewrites on this machine, so its bounded caches fill and its
   backpressure holds (``STATE_MAX_UNSTORED_CUSTOMERS``): what the services hold at their
   largest. Until 2026-12-05 the default was 50 msg/s for 30 s, which filled nothing;
3. samples VmRSS every half second and reads VmHWM (peak resident set) of every service at
   the end, with how many messages got through (MessageAdded events) and how long
   conversation-state's consumer waited for its store (``hometeam_state_backpressure_seconds_total``),
   then removes everything it created.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from array import array
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.pipeline import (
    SERVICES,
    Collector,
    RunIds,
    agent_ids,
    batch_env,
    bench_directory,
    bring_agents_online,
    cleanup,
    endpoints,
    make_population,
    metric_families,
    proc_memory_kb,
    run_generator,
    run_until_signalled,
    service_env,
    stack_pids,
    start_services,
    stop_services,
    write_directory,
)

SEED_BATCH = 10_000


# Input kinds a customer's recent inputs come from (``lifecycle.input_id``), about as often as
# a conversation brings them: messages, their routing decisions, agents' replies and closes.
HISTORY_KINDS = ("message_id", "decision_id", "action_id", "message_id", "action_id", "command_id")


# Distinct histories made (``customer_history``); customers share them, which changes nothing
# the bench measures (a service decodes each customer's document into objects of its own) and
# keeps a million customers within the seeding budget.
HISTORIES = 256
_histories: list[Any] = []


def customer_history(customer: Any, now: datetime, rng: random.Random) -> None:
    """Give the customer what a customer who has written before carries (conversation-state
    keeps it whatever its age): the latest ``RECENT_INPUTS_ALWAYS`` input ids with their
    times, reply gaps up to ``MAX_REPLY_GAPS`` and the applied offsets of the five input
    topics; one of ``HISTORIES`` made once."""
    from dataclasses import replace

    if not _histories:
        for _ in range(HISTORIES):
            made = replace(customer)  # (a new customer: no history yet)
            _make_history(made, now, rng)
            _histories.append(made)
    source = rng.choice(_histories)
    for name in ("recent_inputs", "recent_input_at", "reply_gaps_s", "applied", "seq"):
        setattr(customer, name, getattr(source, name))


def _make_history(customer: Any, now: datetime, rng: random.Random) -> None:
    from services.conversation_state.app import INPUTS
    from services.conversation_state.handlers import applied_key_of
    from services.conversation_state.lifecycle import MAX_REPLY_GAPS, RECENT_INPUTS_ALWAYS, CustomerRecords, remember_applied

    last = now - timedelta(days=1 + rng.random() * 24)
    records = CustomerRecords(customer)
    for i in range(RECENT_INPUTS_ALWAYS):
        h = f"{rng.getrandbits(128):032x}"  # an id shaped like the uuids the services make
        # (an input with one id field, as ``lifecycle.input_id`` reads it)
        payload = SimpleNamespace(**{HISTORY_KINDS[i % len(HISTORY_KINDS)]: f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"})
        remember_applied(records, payload, last - timedelta(minutes=(RECENT_INPUTS_ALWAYS - i) * 3))
    customer.reply_gaps_s = array("d", (round(rng.expovariate(1 / 120.0), 3) for _ in range(rng.randrange(MAX_REPLY_GAPS // 2, MAX_REPLY_GAPS + 1))))
    customer.applied = {applied_key_of(t.name, rng.randrange(12)): rng.randrange(10**7) for t in INPUTS}
    customer.seq = rng.randrange(50, 500)


def customer_docs(
    population: Sequence[Any], start: int, stop: int, directory: Any, rng: random.Random, history: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Identity and customer documents for customers ``start``..``stop`` of the population
    (``history``: each with what a customer who wrote before carries, ``customer_history``)."""
    from services.conversation_state.model import Customer
    from services.ingest.identity import identity_key
    from shared.runtime.compact import compact_document
    from shared.contracts.common import Channel
    from shared.teams import home_team_for

    created = datetime(2026, 1, 1, tzinfo=UTC)
    now = datetime.now(UTC)
    teams = {t.id: [a.id for a in t.agents] for t in directory.teams}
    identities, customers = [], []
    for n in range(start, stop):
        c = population[n]
        customer_id = f"cus_mem{n:08d}"
        channel = Channel(c.channel)
        team, source = home_team_for(directory, channel=channel, address=c.address, market=c.market)
        known = rng.random() < 0.33
        customer = Customer(
            id=customer_id,
            home_team_id=team,
            home_team_source=source,
            created_at=created,
            authenticated=c.channel == "app",
            addresses={c.channel: c.address},
            business_ids={c.channel: c.business_id} if c.business_id else {},
            last_channel=channel,
            known_agent_id=rng.choice(teams[team]) if known else None,
            known_agent_served_at=now - timedelta(days=rng.randrange(25)) if known else None,
        )
        if history:
            customer_history(customer, now, rng)
        identities.append({"_id": identity_key(channel, c.address), "customer_id": customer_id, "created_at": created})
        customers.append(compact_document(customer.to_doc()))
    return identities, customers


async def seed(
    db_ingest: Any, db_state: Any, population: Sequence[Any], start: int, stop: int, directory: Any, seed_value: int, history: bool = True
) -> float:
    """Insert identities and customers [start, stop); returns the seconds it took."""
    rng = random.Random(seed_value + start)
    started = time.monotonic()
    for lo in range(start, stop, SEED_BATCH):
        identities, customers = customer_docs(population, lo, min(stop, lo + SEED_BATCH), directory, rng, history)
        await asyncio.gather(
            db_ingest["identities"].insert_many(identities, ordered=False),
            db_state["customers"].insert_many(customers, ordered=False),
        )
    return time.monotonic() - started


async def backpressure_seconds(processes: dict[str, Any]) -> dict[str, float]:
    """``hometeam_state_backpressure_seconds_total`` of each state that has it (conversation-state's), by service/state."""
    out: dict[str, float] = {}
    for module, process in processes.items():
        try:
            families = await metric_families(process.port)
        except Exception as exc:  # reported, never fatal: the memory figures stand
            print(f"bench.memory: {module} metrics unreadable: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        for family in families:
            if family.name == "hometeam_state_backpressure_seconds":
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        out[f"{module}/{sample.labels['state']}"] = sample.value
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from pymongo import AsyncMongoClient

    from shared.runtime.topics import ensure_topics
    from shared.teams import parse_directory

    bootstrap, mongodb_url = endpoints()
    ids = RunIds.new("mem")
    work = Path(tempfile.mkdtemp(prefix=f"hometeam-memory-{ids.run}-"))
    raw_directory = bench_directory(args.teams, 35, 100)
    teams_config = write_directory(raw_directory, work)
    directory = parse_directory(raw_directory)
    result: dict[str, Any] = {
        "requested_customers": args.customers,
        "history": args.history,
        "run": ids.run,
        "started_at": datetime.now(UTC).isoformat(),
    }
    mongo: AsyncMongoClient = AsyncMongoClient(mongodb_url, tz_aware=True)
    processes: dict[str, Any] = {}
    collector: Collector | None = None
    try:
        await ensure_topics(bootstrap, prefix=ids.prefix)
        db_ingest, db_state = mongo[ids.database_of("ingest")], mongo[ids.database_of("conversation_state")]
        print(f"bench.memory: building {args.customers:,} customers ...", file=sys.stderr, flush=True)
        population = make_population(args.customers, args.teams, args.seed)

        probe = min(args.probe, args.customers)
        probe_s = await seed(db_ingest, db_state, population, 0, probe, directory, args.seed, args.history)
        rate = probe / probe_s  # customers (two documents each) per second
        estimate = args.customers / rate
        result["seed_probe"] = {"customers": probe, "seconds": probe_s, "customers_per_s": rate, "estimated_seconds_for_all": estimate}
        print(
            f"bench.memory: seeded {probe:,} customers in {probe_s:.1f} s ({rate:,.0f}/s, two documents each); "
            f"all {args.customers:,} would take ~{estimate:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        count = args.customers
        if estimate > args.max_seed_seconds:
            count = max(probe, int(rate * args.max_seed_seconds) // 50_000 * 50_000)
            print(f"bench.memory: over the {args.max_seed_seconds:.0f} s budget: seeding {count:,} customers instead", file=sys.stderr, flush=True)
        rest_s = await seed(db_ingest, db_state, population, probe, count, directory, args.seed, args.history) if count > probe else 0.0
        result["customers"] = count
        result["seed_seconds"] = probe_s + rest_s
        print(f"bench.memory: {count:,} known customers seeded in {probe_s + rest_s:.0f} s", file=sys.stderr, flush=True)

        env = service_env(ids, bootstrap, mongodb_url, teams_config, batch_env(args.batch_max_records))
        processes = await start_services(SERVICES, env, work)
        await bring_agents_online(bootstrap, ids, agent_ids(raw_directory), mongo[ids.database_of("team_routing")])
        collector = Collector(bootstrap, ids.prefix)
        await collector.start()
        rss_at_start = {m: proc_memory_kb(p.pid).get("VmRSS") for m, p in processes.items()}

        spec = {
            "bootstrap": bootstrap,
            "topic": ids.prefix + "channel.inbound.v1",
            "customers": count,
            "teams": args.teams,
            "seed": args.seed,
            "step_seed": args.seed * 1000 + 1,
            "tag": f"{ids.run}-mem",
            "rate": args.rate,
            "duration": args.duration,
            "skew": 1.0,  # uniform over the known customers
        }
        samples: list[dict[str, int | None]] = []
        # conversation-state over time: seconds from the load's start, VmRSS (KB) and its
        # customers not yet stored (where in the load its peak comes).
        series: list[tuple[float, int | None, float | None]] = []
        load_started = time.monotonic()

        async def unstored_customers() -> float | None:
            try:
                families = await metric_families(processes["conversation_state"].port, 2.0, names=("hometeam_state_unstored_records",))
            except Exception:  # a missed point, never fatal
                return None
            return next((s.value for f in families for s in f.samples if s.labels.get("state") == "conversations"), None)

        async def sample() -> None:
            while True:
                samples.append({m: proc_memory_kb(p.pid).get("VmRSS") for m, p in processes.items()})
                series.append((round(time.monotonic() - load_started, 1), samples[-1].get("conversation_state"), await unstored_customers()))
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample())
        print(f"bench.memory: {args.rate:g} msg/s for {args.duration:g} s over random known customers ...", file=sys.stderr, flush=True)
        _, gen = await run_generator(spec)
        await asyncio.sleep(args.settle)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        done = sum(1 for m in gen["message_ids"] if m in collector.added)
        backpressure = await backpressure_seconds(processes)
        peaks = {m: proc_memory_kb(p.pid).get("VmHWM") for m, p in processes.items()}
        infra = {name: proc_memory_kb(pid).get("VmHWM") for name, pid in stack_pids().items()}
        result.update(
            {
                "messages_sent": gen["messages"],
                "messages_through": done,
                "rss_at_start_kb": rss_at_start,
                "rss_max_sampled_kb": {m: max((s.get(m) or 0) for s in samples) for m in processes},
                "conversation_state_series": [{"t": t, "rss_kb": rss, "unstored": unstored} for t, rss, unstored in series],
                "peak_rss_kb": peaks,
                "infra_peak_rss_kb": infra,
                "backpressure_seconds": backpressure,
            }
        )
    finally:
        if collector is not None:
            await collector.stop()
        stop_services(processes)
        await mongo.close()
        await cleanup(bootstrap, mongodb_url, ids)
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--customers", type=int, default=1_000_000, help="known customers to seed")
    p.add_argument(
        "--no-history",
        dest="history",
        action="store_false",
        help="seed customers as if new (no recent inputs, reply gaps or applied offsets; the default before 2026-12-05 13:00)",
    )
    p.add_argument("--probe", type=int, default=50_000, help="customers seeded first to measure the seeding rate")
    p.add_argument("--max-seed-seconds", type=float, default=300.0, help="seed fewer customers if all would take longer")
    p.add_argument("--rate", type=float, default=700.0, help="messages/s of the load")
    p.add_argument("--duration", type=float, default=90.0)
    p.add_argument("--settle", type=float, default=20.0, help="seconds to keep sampling after the load")
    p.add_argument("--teams", type=int, default=4)
    p.add_argument("--batch-max-records", type=int, default=None, help="records per consumer batch (default: the services' own)")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--out", default="bench-results", help="folder for the JSON")
    args = p.parse_args(argv)
    result = asyncio.run(run_until_signalled(run(args)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"memory-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(
        f"memory benchmark: {result['customers']:,} known customers (asked for {result['requested_customers']:,}); "
        f"seeded in {result['seed_seconds']:.0f} s; load {args.rate:g} msg/s for {args.duration:g} s, "
        f"{result['messages_through']}/{result['messages_sent']} messages through"
    )
    print(f"{'service':<22}{'RSS at start MB':>17}{'max RSS MB':>12}{'peak (VmHWM) MB':>17}")
    for m in result["peak_rss_kb"]:
        print(
            f"{m:<22}{(result['rss_at_start_kb'][m] or 0) / 1024:>17.0f}{result['rss_max_sampled_kb'][m] / 1024:>12.0f}"
            f"{(result['peak_rss_kb'][m] or 0) / 1024:>17.0f}"
        )
    for name, kb in result["infra_peak_rss_kb"].items():
        print(f"{name + ' (shared)':<22}{'':>17}{'':>12}{(kb or 0) / 1024:>17.0f}")
    for state, seconds in result["backpressure_seconds"].items():
        print(f"backpressure {state}: waited {seconds:.1f} s for the store (the rest of the load stayed in Kafka)")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
