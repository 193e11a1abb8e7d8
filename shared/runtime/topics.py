"""Creating the topics of the registry (idempotent): used by ``scripts/stack.sh topics``, the
compose topic-init step and the tests (which prefix names to isolate a run)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from shared.contracts.registry import all_topic_partitions


async def ensure_topics(
    bootstrap: str,
    *,
    prefix: str = "",
    replication: int = 1,
    timeout_s: float = 60.0,
    client_options: dict[str, Any] | None = None,
) -> list[str]:
    """Create missing topics, grow ones with too few partitions, and wait until every
    partition has a leader. Returns one line per topic saying what was done."""
    wanted = {prefix + name: n for name, n in all_topic_partitions().items()}
    deadline = time.monotonic() + timeout_s
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="hometeam-topics", request_timeout_ms=30_000, **(client_options or {})
    )
    report: list[str] = []

    async def existing() -> dict[str, tuple[int, bool]]:
        out = {}
        for t in await admin.describe_topics(list(wanted)):
            if t["error_code"] == 0:
                parts = t["partitions"]
                out[t["topic"]] = (len(parts), all(p["leader"] >= 0 for p in parts))
        return out

    await admin.start()
    try:
        have = await existing()
        missing = [n for n in wanted if n not in have]
        if missing:
            resp = await admin.create_topics(
                [NewTopic(n, wanted[n], replication) for n in missing], timeout_ms=int(timeout_s * 1000)
            )
            for entry in resp.topic_errors:
                name, code = entry[0], entry[1]
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise RuntimeError(f"could not create topic {name}: error {code} {entry[2:]}")
                report.append(f"created {name} partitions={wanted[name]}")
        grow = {n: wanted[n] for n, (count, _) in have.items() if count < wanted[n]}
        if grow:
            await admin.create_partitions({n: NewPartitions(total) for n, total in grow.items()})
            report.extend(f"grown   {n} partitions {have[n][0]} -> {t}" for n, t in grow.items())
        report.extend(f"ok      {n} partitions={c}" for n, (c, _) in sorted(have.items()) if n not in grow)
        while True:
            now = await existing()
            pending = [n for n, p in wanted.items() if n not in now or now[n][0] < p or not now[n][1]]
            if not pending:
                return report
            if time.monotonic() >= deadline:
                raise TimeoutError(f"topics without leaders before the deadline: {', '.join(sorted(pending))}")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def delete_topics_with_prefix(bootstrap: str, prefix: str, client_options: dict[str, Any] | None = None) -> int:
    """Delete every topic whose name starts with ``prefix`` (a test's or benchmark run's own
    topics, so runs do not pile up partitions, files and disk on a long-lived broker)."""
    if not prefix:
        raise ValueError("refusing to delete every topic: give a prefix")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="hometeam-topics", **(client_options or {}))
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if mine:
            await admin.delete_topics(mine, timeout_ms=30_000)
        return len(mine)
    finally:
        await admin.close()
