"""The skeleton benchmark: how fast can the pipeline's Kafka traffic alone go on this machine?

    python -m bench.skeleton --messages 60000 --passes 2 --modes bytes,parsed --out bench-results/skeleton

Five bare aiokafka processes stand in for the five services and move records between the
services' topics in the shape ``make bench`` measures per inbound message (``Shape``; ``make
bench`` passes its own pipeline run's with ``--shape-from``): ingest
turns each inbound record into a ``messages.received.v1`` record; conversation-state turns each
of those into 1 ``conversations.events.v1`` record, plus a second event for
``extra_event_share`` of them and a ``routing.commands.v1`` record for ``opened_share``;
team-routing answers each command with a ``routing.decisions.v1`` record, which
conversation-state turns into one more event; the sweeper and metrics each read every event.
No record is decoded and nothing is stored: each process consumes a batch (the services'
batch size and fetch settings), re-produces the record's own bytes where the shape says (the
services' producer settings), awaits the acknowledgements and commits, as the services do.
In the ``parsed`` mode each also parses every record it reads and writes it re-serialised
(pydantic-core's JSON, which the services' decoders use): the least any service that reads
its records does.

The inbound topic is preloaded, as the raw pass-through baseline's source is, so both are
timed at full speed, and the same run measures that baseline (one hop, one process:
``bench.pipeline.baseline``). The skeleton's throughput over the baseline's is therefore the
highest ratio any implementation of the services could reach with this traffic on this
machine, before decoding a record or writing the store: the ceiling for the issue's "pipeline
≥ 0.35 × the raw pass-through baseline". Its CPU per message is the floor under the pipeline's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydantic_core

from bench.pipeline import (
    BATCH_TIMEOUT_MS,
    PRODUCER_SETTINGS,
    SENTINEL,
    Plan,
    RunIds,
    baseline,
    check_plan,
    create_topics,
    default_batch_max_records,
    delete_run_topics,
    endpoints,
    machine_info,
    make_population,
    plan_messages,
    preload,
    proc_cpu_seconds,
    stack_pids,
    stamp,
    topic_partitions,
)

INBOUND = "channel.inbound.v1"
RECEIVED = "messages.received.v1"
COMMANDS = "routing.commands.v1"
DECISIONS = "routing.decisions.v1"
EVENTS = "conversations.events.v1"
TOPICS = (INBOUND, RECEIVED, COMMANDS, DECISIONS, EVENTS)

# What each stand-in reads (the topics of its service that carry the inbound message's path).
STAGES: dict[str, tuple[str, ...]] = {
    "ingest": (INBOUND,),
    "conversation_state": (RECEIVED, DECISIONS),
    "team_routing": (COMMANDS,),
    "timeout_sweeper": (EVENTS,),
    "metrics": (EVENTS,),
}
# What each writes (``Shape.outputs``).
OUTPUTS: dict[str, tuple[str, ...]] = {
    "ingest": (RECEIVED,),
    "conversation_state": (EVENTS, COMMANDS),
    "team_routing": (DECISIONS,),
    "timeout_sweeper": (),
    "metrics": (),
}
BUCKETS = 10_000


@dataclass(frozen=True)
class Shape:
    """Records per inbound message. The defaults are what ``make bench`` measured at its highest
    bounded rate (2026-12-06 01:06 UTC, 2,500 msg/s offered, late in the sweep, when most
    customers already have a conversation: produced 1.00 received, 1.11 events, 0.045 commands
    and 0.045 decisions; consumed 4.30). A step of new customers opens more conversations (a
    40 s step at 2,500 msg/s alone: 0.24 commands, 1.55 events; ``--opened-share 0.24
    --extra-event-share 0.31``). ``from_pipeline_result`` takes a run's own."""

    opened_share: float = 0.045  # messages that open a conversation: a command, a decision, an event
    extra_event_share: float = 0.065  # messages that make a second event

    @classmethod
    def from_pipeline_result(cls, result: dict[str, Any]) -> Shape:
        """The shape of a ``bench.pipeline`` result's step at its highest bounded rate (else
        its last step)."""
        steps = [s for s in result["steps"] if s.get("per_message")]
        if not steps:
            raise ValueError("the result has no step with per-message figures")
        top = result.get("summary", {}).get("highest_bounded_rate")
        step = next((s for s in steps if s["rate"] == top and s.get("bounded")), steps[-1])
        produced = step["per_message"]["records_produced"]
        opened = produced.get(COMMANDS, 0.0)
        return cls(opened_share=round(opened, 4), extra_event_share=round(max(0.0, produced.get(EVENTS, 1.0) - 1.0 - opened), 4))

    def bucket(self, value: bytes) -> int:
        return zlib.crc32(value) % BUCKETS

    def outputs(self, stage: str, topic: str, value: bytes) -> tuple[str, ...]:
        """The topics a stage writes for one record it read (each gets the record's bytes)."""
        if stage == "ingest":
            return (RECEIVED,)
        if stage == "team_routing":
            return (DECISIONS,)
        if stage != "conversation_state":
            return ()
        if topic == DECISIONS:
            return (EVENTS,)
        b = self.bucket(value)
        opened = round(self.opened_share * BUCKETS)
        if b < opened:
            return (EVENTS, COMMANDS)
        if b < opened + round(self.extra_event_share * BUCKETS):
            return (EVENTS, EVENTS)
        return (EVENTS,)

    def expected(self, bodies: Sequence[bytes]) -> dict[str, dict[str, int]]:
        """Records each stage will read and each topic will receive for these inbound bodies."""
        written = dict.fromkeys(TOPICS, 0)
        written[INBOUND] = len(bodies)
        for body in bodies:
            for t in self.outputs("conversation_state", RECEIVED, body):
                written[t] += 1
        written[RECEIVED] = len(bodies)
        written[DECISIONS] = written[COMMANDS]
        written[EVENTS] += written[DECISIONS]
        read = {stage: sum(written[t] for t in topics) for stage, topics in STAGES.items()}
        return {"read": read, "written": written}


# --------------------------------------------------------------------------------------------
# One stand-in: a child process of its own, like a service


def _stage_main(spec: dict[str, Any], conn: Any) -> None:
    asyncio.run(_stage(spec, conn))


async def _stage(spec: dict[str, Any], conn: Any) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    stage, prefix, shape = spec["stage"], spec["prefix"], Shape(**spec["shape"])
    consumer = AIOKafkaConsumer(
        bootstrap_servers=spec["bootstrap"],
        group_id=spec["group"],
        enable_auto_commit=False,
        client_id=f"skeleton-{stage}",
        **spec["consumer"],
    )
    producer = AIOKafkaProducer(bootstrap_servers=spec["bootstrap"], client_id=f"skeleton-{stage}", **PRODUCER_SETTINGS)
    await consumer.start()
    await producer.start()
    try:
        tps = [TopicPartition(prefix + t, p) for t in STAGES[stage] for p in range(spec["partitions"][t])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        for t in OUTPUTS[stage]:
            await producer.partitions_for(prefix + t)
        conn.send(("ready", None))
        conn.recv()  # go
        cpu0 = proc_cpu_seconds(os.getpid()) or 0.0
        expected, batch = spec["expected"], spec["batch_max_records"]
        read = written = batches = 0
        first: float | None = None
        deadline = time.monotonic() + spec["timeout_s"]
        cut = len(prefix)
        send = producer.send
        parse, loads, dumps = spec["parse"], pydantic_core.from_json, pydantic_core.to_json
        while read < expected and time.monotonic() < deadline:
            got = await consumer.getmany(timeout_ms=BATCH_TIMEOUT_MS, max_records=batch)
            if not got:
                continue
            if first is None:
                first = time.time()
            futures = []
            for tp, records in got.items():
                topic = tp.topic[cut:]
                for r in records:
                    value = dumps(loads(r.value)) if parse else r.value
                    for out in shape.outputs(stage, topic, r.value):
                        futures.append(await send(prefix + out, value, key=r.key))
                read += len(records)
            if futures:
                await asyncio.gather(*futures)
                written += len(futures)
            await consumer.commit()
            batches += 1
        last = time.time()
        cpu = (proc_cpu_seconds(os.getpid()) or 0.0) - cpu0
    finally:
        await consumer.stop()
        await producer.stop()
    conn.send(("done", {"read": read, "written": written, "batches": batches, "first": first, "last": last, "cpu_seconds": cpu}))


# --------------------------------------------------------------------------------------------
# One pass: fresh topics, the inbound preloaded, the five stand-ins started, then timed


def consumer_settings() -> dict[str, Any]:
    """The services' fetch settings (``batch_subscriber_options``), for the stand-ins."""
    from shared.settings import ServiceSettings

    fields = ServiceSettings.model_fields
    return {
        "fetch_min_bytes": fields["consumer_fetch_min_bytes"].default,
        "fetch_max_wait_ms": fields["consumer_fetch_max_wait_ms"].default,
        "max_partition_fetch_bytes": fields["consumer_max_partition_fetch_bytes"].default,
        "auto_offset_reset": "earliest",
    }


async def end_offsets(bootstrap: str, topics: Sequence[str], partitions: dict[str, int]) -> dict[str, int]:
    """Records in each topic (the sum of its partitions' end offsets)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, client_id="skeleton-ends")
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(partitions[t])]
        ends = await consumer.end_offsets(tps)
        return {t: sum(v for tp, v in ends.items() if tp.topic == t) for t in topics}
    finally:
        await consumer.stop()


async def run_pass(
    bootstrap: str,
    ids: RunIds,
    k: int,
    bodies: Sequence[bytes],
    keys: Sequence[bytes],
    shape: Shape,
    batch_max_records: int,
    timeout_s: float,
    parse: bool = False,
) -> dict[str, Any]:
    """One timed pass over fresh topics ``<run prefix>p<k>.*`` (``parse``: each stand-in
    parses what it reads and writes it re-serialised; the inbound bodies are preloaded as
    the stand-ins write them, so each record keeps its bytes, and its bucket, all the way)."""
    if parse:
        bodies = [pydantic_core.to_json(pydantic_core.from_json(b)) for b in bodies]
    prefix = f"{ids.prefix}p{k}."
    partitions = {t: topic_partitions("")[t] for t in TOPICS}
    await create_topics(bootstrap, {prefix + t: n for t, n in partitions.items()})
    preload_s = await preload(bootstrap, prefix + INBOUND, bodies, keys, "skeleton-preload")
    expected = shape.expected(bodies)
    ctx = multiprocessing.get_context("spawn")
    children: dict[str, tuple[Any, Any]] = {}
    try:
        for stage in STAGES:
            parent, child = ctx.Pipe()
            spec = {
                "stage": stage,
                "prefix": prefix,
                "bootstrap": bootstrap,
                "group": f"{ids.group_prefix}.p{k}.{stage}",
                "partitions": partitions,
                "consumer": consumer_settings(),
                "shape": asdict(shape),
                "expected": expected["read"][stage],
                "batch_max_records": batch_max_records,
                "timeout_s": timeout_s,
                "parse": parse,
            }
            proc = ctx.Process(target=_stage_main, args=(spec, child), daemon=True)
            proc.start()
            child.close()
            children[stage] = (proc, parent)
        for stage, (_, conn) in children.items():
            kind, _ = await asyncio.to_thread(conn.recv)
            assert kind == "ready", stage
        broker = stack_pids().get("kafka")
        broker0 = proc_cpu_seconds(broker) if broker else None
        for _, conn in children.values():
            conn.send("go")
        reports = {}
        for stage, (_, conn) in children.items():
            kind, reports[stage] = await asyncio.to_thread(conn.recv)
            assert kind == "done", stage
        broker1 = proc_cpu_seconds(broker) if broker else None
    finally:
        for proc, _ in children.values():
            await asyncio.to_thread(proc.join, 30)
            if proc.is_alive():
                proc.kill()
    written = await end_offsets(bootstrap, [prefix + t for t in TOPICS], {prefix + t: n for t, n in partitions.items()})
    n = len(bodies)
    firsts = [r["first"] for r in reports.values() if r["first"] is not None]
    elapsed = max(r["last"] for r in reports.values()) - min(firsts) if firsts else None
    complete = all(reports[s]["read"] == expected["read"][s] for s in STAGES)
    stages_cpu = sum(r["cpu_seconds"] for r in reports.values())
    broker_cpu = broker1 - broker0 if broker0 is not None and broker1 is not None else None
    return {
        "messages": n,
        "preload_seconds": preload_s,
        "seconds": elapsed,
        "rate": n / elapsed if complete and elapsed else None,
        "complete": complete,
        "expected": expected,
        "written": {t[len(prefix) :]: v for t, v in written.items()},
        "stages": reports,
        "stages_cpu_seconds": stages_cpu,
        "broker_cpu_seconds": broker_cpu,
        "cpu_ms_per_message": (stages_cpu + (broker_cpu or 0.0)) * 1000 / n,
        "stages_cpu_ms_per_message": stages_cpu * 1000 / n,
        "broker_cpu_ms_per_message": broker_cpu * 1000 / n if broker_cpu is not None else None,
    }


# --------------------------------------------------------------------------------------------
# The run


def make_plan(messages: int, seed: int, tag: str) -> Plan:
    """``messages`` inbound envelopes as the pipeline benchmark makes its baseline's."""
    plan = plan_messages(make_population(20_000, 4, seed), rate=messages, duration=1.0, seed=seed * 1000 + 999, tag=tag)
    check_plan(plan)
    return plan


MODES = {"bytes": False, "parsed": True}  # mode → each stand-in parses what it reads
MODE_TEXT = {"bytes": "records' bytes as they are", "parsed": "each record parsed and re-serialised"}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    bootstrap, _ = endpoints()
    ids = RunIds.new("skel")
    if args.shape_from:
        shape = Shape.from_pipeline_result(json.loads(Path(args.shape_from).read_text()))
        print(f"skeleton: the shape of {args.shape_from}: {asdict(shape)}", file=sys.stderr, flush=True)
    else:
        shape = Shape(args.opened_share, args.extra_event_share)
    batch = args.batch_max_records or default_batch_max_records()
    plan = make_plan(args.messages, args.seed, ids.run)
    now = stamp(time.time())
    bodies, keys = [b.replace(SENTINEL, now) for b in plan.bodies], plan.keys
    result: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(),
        "run": ids.run,
        "machine": machine_info(),
        "settings": {
            "messages": len(bodies),
            "passes": args.passes,
            "shape": asdict(shape),
            "shape_from": args.shape_from,
            "batch_max_records": batch,
            "modes": args.modes,
        },
        "modes": {},
    }
    try:
        print(f"skeleton: run {ids.run}: {len(bodies)} messages, the raw pass-through baseline first ...", file=sys.stderr, flush=True)
        result["baseline"] = await baseline(bootstrap, ids, plan, batch)
        print(f"skeleton: baseline {result['baseline']['passthrough_rate']:.0f} msg/s", file=sys.stderr, flush=True)
        k = 0
        for mode in args.modes:
            passes = []
            for _ in range(args.passes):
                p = await run_pass(bootstrap, ids, k, bodies, keys, shape, batch, args.timeout, MODES[mode])
                k += 1
                passes.append(p)
                print(
                    f"skeleton: {mode} pass {len(passes)}: {p['rate'] or 0:.0f} msg/s, {p['cpu_ms_per_message']:.3f} ms of CPU per message"
                    + ("" if p["complete"] else " (INCOMPLETE: a stand-in did not read what it should)"),
                    file=sys.stderr,
                    flush=True,
                )
            done = [p for p in passes if p["rate"]]
            result["modes"][mode] = {"passes": passes, "best": max(done, key=lambda p: p["rate"]) if done else None}
    finally:
        deleted = await delete_run_topics(bootstrap, ids.prefix)
        print(f"skeleton: deleted {deleted} topics {ids.prefix}*", file=sys.stderr, flush=True)
    return result


def summary(result: dict[str, Any]) -> list[str]:
    base = result["baseline"]
    shape = result["settings"]["shape"]
    lines = [
        f"raw pass-through baseline (one hop, one process): {base['passthrough_rate']:,.0f} msg/s, "
        f"{base['cpu_ms_per_record_hop']:.3f} ms of CPU per record hop (process + broker)",
    ]
    shown = False
    for mode, out in result["modes"].items():
        best = out["best"]
        if best is None:
            lines.append(f"skeleton, {MODE_TEXT[mode]}: no pass completed")
            continue
        n, w = best["messages"], best["written"]
        if not shown:
            produced = sum(v for t, v in w.items() if t != INBOUND) / n
            consumed = sum(best["expected"]["read"].values()) / n
            lines.append(
                f"shape per inbound message: produced {produced:.2f} (received {w[RECEIVED] / n:.2f}, events {w[EVENTS] / n:.2f}, "
                f"commands {w[COMMANDS] / n:.2f}, decisions {w[DECISIONS] / n:.2f}), consumed {consumed:.2f} "
                f"(opened_share {shape['opened_share']}, extra_event_share {shape['extra_event_share']})"
            )
            shown = True
        rates = " / ".join(f"{p['rate']:,.0f}" if p["rate"] else "incomplete" for p in out["passes"])
        lines += [
            f"skeleton, {MODE_TEXT[mode]} (five bare processes, no store): {best['rate']:,.0f} msg/s (passes: {rates}), "
            f"{best['cpu_ms_per_message']:.3f} ms of CPU per message (stand-ins {best['stages_cpu_ms_per_message']:.3f}, "
            f"broker {best['broker_cpu_ms_per_message'] or 0:.3f})",
            f"  ceiling of the ratio pipeline / baseline: {best['rate'] / base['passthrough_rate']:.3f} (the issue's target: 0.35); "
            f"at 5,000 msg/s this traffic alone takes {best['cpu_ms_per_message'] * 5:.2f} of the {os.cpu_count()} cores",
        ]
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=60_000, help="inbound messages per pass (and for the baseline)")
    p.add_argument("--passes", type=int, default=2, help="timed passes of the skeleton; the fastest counts")
    p.add_argument("--opened-share", type=float, default=Shape.opened_share)
    p.add_argument("--extra-event-share", type=float, default=Shape.extra_event_share)
    p.add_argument(
        "--shape-from",
        metavar="RESULT_JSON",
        help="take the shape from a bench.pipeline result: its step at the highest bounded rate (make bench passes its own run's)",
    )
    p.add_argument("--batch-max-records", type=int, default=None, help="records per batch (default: the services')")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a stage waits for its records at most")
    p.add_argument(
        "--modes",
        type=lambda v: [m for m in v.split(",") if m],
        default=list(MODES),
        help="bytes: each stand-in re-produces the records' bytes as they are; parsed: it parses every record it reads "
        "and writes it re-serialised (pydantic-core's Rust JSON, as the services' decoders use), the least a service "
        "that reads its records does (default: both)",
    )
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default="bench-results/skeleton")
    args = p.parse_args(argv)
    if not args.modes or set(args.modes) - set(MODES):
        p.error(f"--modes: one or more of {', '.join(MODES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + ".json")
    path.write_text(json.dumps(result, indent=1, default=str))
    print()
    for line in summary(result):
        print(line)
    print(f"results: {path}")
    complete = all(p["complete"] for out in result["modes"].values() for p in out["passes"])
    return 0 if complete and result["modes"] else 1


if __name__ == "__main__":
    sys.exit(main())
