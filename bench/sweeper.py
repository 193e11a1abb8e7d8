"""How many due deadlines per minute the timeout sweeper fires, with one and with two replicas.

    python -m bench.sweeper [--deadlines 5000] [--replicas 1,2] [--batch-size 200]

For each replica count: a fresh database and topic prefix; ``--deadlines`` inactivity
deadlines already due are inserted as conversation-state's events would arm them
(``{_id, kind: "inactivity", entity, due_at, data: {customer_id, conversation_id}, armed_at}``,
services/timeout_sweeper/store.py); then that many ``python -m services.timeout_sweeper``
processes start with the service's own settings (a sweep claims up to 200 due deadlines one
by one, publishes ``CloseInactiveConversation`` to ``lifecycle.commands.v1`` and deletes what
fired; sweeps follow each other at once while full, else after ``SWEEP_INTERVAL_S``). The
figure is deadlines fired per minute, from the first deadline gone to the last (the store is
polled every 0.2 s); the commands are counted on the topic (end offsets), so a deadline fired
twice would show.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from bench.pipeline import (
    RunIds,
    ServiceProcess,
    bench_directory,
    cleanup,
    endpoints,
    free_port,
    proc_cpu_seconds,
    run_until_signalled,
    service_env,
    topic_partitions,
    write_directory,
)


async def seed(mongodb_url: str, database: str, count: int, seed_value: int) -> float:
    from pymongo import AsyncMongoClient

    rng = random.Random(seed_value)
    now = datetime.now(UTC)
    client: AsyncMongoClient = AsyncMongoClient(mongodb_url, tz_aware=True)
    try:
        db = client[database]
        await db["deadlines"].create_index("due_at")
        await db["deadlines"].create_index([("kind", 1), ("entity", 1)])
        await db["deadline_claims"].create_index("claimed_at")
        started = time.monotonic()
        for start in range(0, count, 5000):
            docs = []
            for n in range(start, min(count, start + 5000)):
                conversation = f"conv-bench-{n:07d}"
                docs.append(
                    {
                        "_id": f"inactivity:{conversation}@{n:012d}",
                        "kind": "inactivity",
                        "entity": conversation,
                        # Due within the last 20 s: one claim attempt (lease 30 s) for the run.
                        "due_at": now - timedelta(seconds=rng.uniform(1, 20)),
                        "data": {"customer_id": f"cus-bench-{n:07d}", "conversation_id": conversation},
                        "armed_at": now - timedelta(hours=2),
                    }
                )
            await db["deadlines"].insert_many(docs, ordered=False)
        return time.monotonic() - started
    finally:
        await client.close()


async def commands_on_topic(bootstrap: str, topic: str) -> int:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(topic_partitions("")["lifecycle.commands.v1"])]
        ends = await consumer.end_offsets(tps)
        return sum(ends.values())
    finally:
        await consumer.stop()


async def trial(replicas: int, args: argparse.Namespace, teams_config: Path, work: Path) -> dict[str, Any]:
    from shared.runtime.topics import ensure_topics

    bootstrap, mongodb_url = endpoints()
    ids = RunIds.new("sweep")
    database = ids.database_of("timeout_sweeper")
    await ensure_topics(bootstrap, prefix=ids.prefix)
    try:
        seed_s = await seed(mongodb_url, database, args.deadlines, args.seed)
        env = service_env(ids, bootstrap, mongodb_url, teams_config, {"MONGODB_DATABASE": database})
        processes = [
            ServiceProcess("timeout_sweeper", {**env, "HTTP_PORT": str(free_port())}, work / f"sweeper-{replicas}-{n}.log")
            for n in range(replicas)
        ]
        client: AsyncMongoClient = AsyncMongoClient(mongodb_url, tz_aware=True)
        deadlines = client[database]["deadlines"]
        first_gone = last_gone = None
        cpu0: dict[int, float] = {}
        try:
            for p in processes:
                p.start()
                cpu0[p.pid] = proc_cpu_seconds(p.pid) or 0.0
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                left = await deadlines.count_documents({"kind": "inactivity"})
                now = time.monotonic()
                if left < args.deadlines and first_gone is None:
                    first_gone = now
                if left == 0:
                    last_gone = now
                    break
                for p in processes:
                    if p.proc is not None and p.proc.poll() is not None:
                        raise RuntimeError(f"a sweeper exited; see {p.log}")
                await asyncio.sleep(0.2)
            cpu = [(proc_cpu_seconds(p.pid) or 0.0) - cpu0[p.pid] for p in processes]
        finally:
            for p in processes:
                p.stop()
            await client.close()
        if first_gone is None or last_gone is None:
            raise TimeoutError(f"deadlines still due after {args.timeout:.0f} s")
        sweeping = max(0.2, last_gone - first_gone)
        emitted = await commands_on_topic(bootstrap, ids.prefix + "lifecycle.commands.v1")
        return {
            "replicas": replicas,
            "deadlines": args.deadlines,
            "seed_seconds": seed_s,
            "sweep_seconds": sweeping,
            "commands_emitted": emitted,
            "per_minute": args.deadlines / sweeping * 60,
            "cpu_seconds": cpu,
        }
    finally:
        await cleanup(bootstrap, mongodb_url, ids)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="hometeam-sweeper-bench-"))
    teams_config = write_directory(bench_directory(1, 5, 10), work)
    results = []
    try:
        for replicas in args.replicas:
            print(f"bench.sweeper: {args.deadlines} due deadlines, {replicas} replica(s) ...", file=sys.stderr, flush=True)
            results.append(await trial(replicas, args, teams_config, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sweeper", description=__doc__.split("\n\n")[0])
    p.add_argument("--deadlines", type=int, default=5000)
    p.add_argument("--replicas", default="1,2", help="replica counts to try, e.g. 1,2")
    p.add_argument("--timeout", type=float, default=240.0, help="give up after this many seconds per trial")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    args.replicas = [int(r) for r in str(args.replicas).split(",") if r.strip()]
    results = asyncio.run(run_until_signalled(run(args)))
    print(f"timeout-sweeper benchmark: {args.deadlines} due inactivity deadlines (service defaults: 200 per sweep)")
    print(f"{'replicas':>8}{'seconds':>10}{'deadlines/min':>15}{'commands':>10}{'  cpu s per replica'}")
    for r in results:
        cpu = "/".join(f"{x:.1f}" for x in r["cpu_seconds"])
        print(f"{r['replicas']:>8}{r['sweep_seconds']:>10.1f}{r['per_minute']:>15,.0f}{r['commands_emitted']:>10}  {cpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
