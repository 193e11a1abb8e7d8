"""Consumer lag of every hometeam consumer group, for the ConsumerLagHigh alert."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from shared.runtime.logging import get_logger

from services.metrics.prom import KpiMetrics

log = get_logger("hometeam.lag")


async def export_lag(bootstrap: str, group_prefix: str, metrics: KpiMetrics, interval_s: float, client_options: dict[str, Any]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="hometeam-lag", **client_options)
    ends = AIOKafkaConsumer(bootstrap_servers=bootstrap, client_id="hometeam-lag", enable_auto_commit=False, **client_options)
    await admin.start()
    await ends.start()
    try:
        while True:
            try:
                groups = [g[0] for g in await admin.list_consumer_groups() if g[0].startswith(group_prefix + ".")]
                for group in groups:
                    committed = await admin.list_consumer_group_offsets(group)
                    if not committed:
                        continue
                    latest = await ends.end_offsets(list(committed))
                    lag: dict[str, int] = defaultdict(int)
                    for tp, meta in committed.items():
                        lag[tp.topic] += max(0, latest.get(tp, 0) - meta.offset)
                    for topic, value in lag.items():
                        metrics.consumer_lag.labels(group, topic).set(value)
            except Exception:  # lag is best effort; never take the service down for it
                log.warning("could not read consumer lag", exc_info=True)
            await asyncio.sleep(interval_s)
    finally:
        await ends.stop()
        await admin.close()
