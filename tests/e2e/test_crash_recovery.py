"""kill -9 of ingest, team-routing, conversation-state or metrics in the middle of a stream
loses nothing and duplicates nothing once it is back (real broker, real store, real
processes): not in conversation-state's store, not in team-routing's pool, not in the
metrics service's KPI counts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from pymongo import AsyncMongoClient

from services.conversation_state.store import ConversationStore
from services.ingest.normalize import address_key
from services.metrics.store import agent_counters
from services.team_routing.store import PoolStore
from shared.contracts.agents import AgentPresenceChanged, Presence
from shared.contracts.channel import ChannelMessagePosted
from shared.runtime.compact import expand_document
from shared.runtime.topics import delete_topics_with_prefix, ensure_topics
from tests.e2e.conftest import DAY, EVERY_DAY
from tests.support import KafkaProbe, eventually, free_ports

REPO = Path(__file__).resolve().parents[2]
CUSTOMERS = 30
MESSAGES_PER_CUSTOMER = 8
TOTAL = CUSTOMERS * MESSAGES_PER_CUSTOMER
SERVICES = ("ingest", "team_routing", "conversation_state", "metrics")


class Process:
    def __init__(self, module: str, env: dict[str, str], log: Path) -> None:
        self.module, self.env, self.log = module, env, log
        self.port = int(env["HTTP_PORT"])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", f"services.{self.module}"], cwd=REPO, env=self.env, stdout=out, stderr=out)

    async def ready(self) -> None:
        async def probe() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"{self.module} exited; see {self.log}"
            try:
                async with httpx.AsyncClient() as client:
                    return (await client.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2)).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(probe, timeout_s=60, what=f"{self.module} ready")
        await asyncio.sleep(0.3)  # a process that could not bind its port stops right after startup
        assert self.proc is not None and self.proc.poll() is None, f"{self.module} exited after startup; see {self.log}"

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.mark.parametrize("victim", SERVICES)
async def test_kill_dash_nine_mid_stream_loses_and_duplicates_nothing(infra, tmp_path, victim):
    run = uuid.uuid4().hex[:10]
    prefix, db_name = f"k{run}.", f"hometeam_crash_{run}"
    await ensure_topics(infra.kafka, prefix=prefix)
    config = tmp_path / "teams.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "default_team": "pnw",
                "standard_pool": {"agents": [{"id": "std-1", "max_concurrency": 100}]},
                "teams": [
                    {
                        "id": "pnw",
                        "name": "Seattle",
                        "timezone": "America/Los_Angeles",
                        "regions": {"area_codes": ["206"]},
                        "hours": EVERY_DAY,
                        "surge": {"max_queue_depth": 1000, "max_oldest_wait_seconds": 86400},
                        "agents": [{"id": "sea-ana", "max_concurrency": 100}, {"id": "sea-ben", "max_concurrency": 100}],
                    }
                ],
            }
        )
    )
    base_env = {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")},
        "KAFKA_BOOTSTRAP_SERVERS": infra.kafka,
        "MONGODB_URL": infra.mongodb_url,
        "MONGODB_DATABASE": db_name,
        "KAFKA_TOPIC_PREFIX": prefix,
        "KAFKA_GROUP_PREFIX": f"crash-{run}",
        "TEAMS_CONFIG": str(config),
        "LOG_LEVEL": "INFO",
        "CONSUMER_BATCH_MAX_RECORDS": "20",
        # conversation-state's writes behind go 4 customers at a time: a kill lands between slices
        "STATE_WRITE_SLICE": "4",
        "PYTHONPATH": str(REPO),
    }
    ports = free_ports(len(SERVICES))
    processes = {m: Process(m, {**base_env, "HTTP_PORT": str(port)}, tmp_path / f"{m}.log") for m, port in zip(SERVICES, ports)}
    client: AsyncMongoClient = AsyncMongoClient(infra.mongodb_url, tz_aware=True)
    db = client[db_name]
    store = ConversationStore(db)
    try:
        for p in processes.values():
            p.start()
        for p in processes.values():
            await p.ready()
        async with KafkaProbe(infra.kafka, prefix) as probe:
            for agent in ("sea-ana", "sea-ben"):
                await probe.send("agent.presence.v1", agent, AgentPresenceChanged(agent_id=agent, presence=Presence.ONLINE, changed_at=DAY - timedelta(hours=1)))

            numbers = [f"+1206555{n:04d}" for n in range(CUSTOMERS)]

            async def stream() -> None:
                for i in range(MESSAGES_PER_CUSTOMER):
                    for c, number in enumerate(numbers):
                        at = DAY + timedelta(seconds=i, milliseconds=c)
                        msg = ChannelMessagePosted(channel="sms", provider_message_id=f"SM{run}{c:03d}{i:03d}", address=number, text=f"{c}:{i}", sent_at=at)
                        await probe.send("channel.inbound.v1", address_key("sms", number), msg, time=at)
                    await asyncio.sleep(0.15)

            streaming = asyncio.create_task(stream())
            progress_topic = {
                "ingest": "messages.received.v1",
                "team_routing": "routing.decisions.v1",
                "conversation_state": "conversations.events.v1",
                "metrics": "conversations.events.v1",
            }[victim]
            await probe.wait_for(progress_topic, lambda e: True, count=10, timeout_s=60)
            processes[victim].kill9()
            await asyncio.sleep(0.5)
            processes[victim].start()
            await processes[victim].ready()
            await streaming

            async def all_stored() -> bool:
                # Conversations are written behind (up to STATE_FLUSH_INTERVAL_S after their
                # lines): wait until each holds all its messages (exact counts checked below).
                # Read as the store answers (a current conversation's counters are in its
                # customer's document; see services.conversation_state.store).
                assigned = await store.overlay_held([expand_document(c) async for c in db["conversations"].find({"agent_id": {"$ne": None}})])
                settled = [c for c in assigned if c["inbound_count"] >= MESSAGES_PER_CUSTOMER]
                return await db["messages"].count_documents({}) == TOTAL and len(settled) == CUSTOMERS

            try:
                await eventually(all_stored, timeout_s=120, what=f"all {TOTAL} messages stored and {CUSTOMERS} conversations assigned")
            except AssertionError as exc:
                stored = await db["messages"].count_documents({})
                unassigned = [(c["_id"][:8], c.get("team_id"), c["status"]) async for c in db["conversations"].find({"agent_id": None})]
                pool, _ = (await PoolStore(db).load(["pnw"]))["pnw"]
                placed = {p.conversation_id[:8]: p.agent_id for p in pool.placements.values()}
                # What conversation-state was given for the first unassigned one (offsets, order).
                trail: list[str] = []
                first = await db["conversations"].find_one({"agent_id": None})
                if first is not None:
                    customer = first["customer_id"]
                    for topic in ("messages.received.v1", "routing.decisions.v1", "conversations.events.v1", "routing.commands.v1"):
                        for r in await probe.records(topic):
                            env = json.loads(r.value)
                            if env["data"].get("customer_id") == customer or env.get("subject") == customer:
                                data = env["data"]
                                trail.append(
                                    f"{topic}@{r.partition}/{r.offset} {env['type'].split('.')[-1]} id={env['id'][:8]} "
                                    f"new={data.get('new_customer')} conv={str(data.get('conversation_id'))[:8]} agent={data.get('agent_id')}"
                                )
                    customer_doc = expand_document(await db["customers"].find_one({"_id": customer}) or {})
                    trail.append(f"customer doc applied={customer_doc.get('applied')} seq={customer_doc.get('seq')}")
                raise AssertionError(
                    f"{exc}: {stored} stored; unassigned {unassigned}; pool placements {placed}; trail of the first:\n" + "\n".join(trail)
                ) from exc

            # Nothing done twice in the store: one conversation per customer, each message once.
            conversations = await store.overlay_held([expand_document(d) async for d in db["conversations"].find({})])
            assert len(conversations) == CUSTOMERS
            assert all(c["inbound_count"] == MESSAGES_PER_CUSTOMER for c in conversations)
            # Team-routing stores pool state behind its decisions (every second, and replays
            # from its checkpoint after a crash): wait for the stored pool to catch up.
            async def pool_stored() -> list[str] | None:
                try:
                    pool, _ = (await PoolStore(db).load(["pnw"]))["pnw"]
                except ValueError:  # read while team-routing replaced a snapshot: read again
                    return None
                placements = list(pool.placements)
                return placements if len(set(placements)) == CUSTOMERS else None

            try:
                placements = await eventually(pool_stored, timeout_s=30, what=f"{CUSTOMERS} placements stored in pool pnw")
            except AssertionError as exc:
                pool_doc = expand_document(await db["pools"].find_one({"_id": "pnw"}) or {})
                stored_ids = set((await PoolStore(db).load(["pnw"]))["pnw"][0].placements)
                missing = [(c["_id"][:8], c.get("team_id"), c.get("agent_id")) for c in conversations if c["_id"] not in stored_ids]
                marks = [d async for d in db["pool_checkpoints"].find({})]
                raise AssertionError(
                    f"{exc}: pool pnw stores {len(stored_ids)} placements, applied {pool_doc.get('applied')}; "
                    f"checkpoints {marks}; not stored: {missing}"
                ) from exc
            assert len(placements) == len(set(placements)) == CUSTOMERS
            # Per-customer order kept, each line at its position (1, 2, ... as the conversation
            # counts them: a replay's line replaced the first run's at the same position).
            for conv in conversations:
                lines = [d async for d in db["messages"].find({"conversation_id": conv["_id"]}).sort([("seq", 1)])]
                assert [int(d["text"].split(":")[1]) for d in lines] == list(range(MESSAGES_PER_CUSTOMER))
                assert [d["_id"] for d in lines] == [f"{conv['_id']}|{n}" for n in range(1, conv["line_count"] + 1)]

            # Events: a repeat after the crash may appear, but only with the same id.
            events = await probe.envelopes("conversations.events.v1")
            added = defaultdict(set)
            assigned = defaultdict(set)
            for e in events:
                if e["type"] == "hometeam.MessageAdded":
                    added[e["data"]["message_id"]].add(e["id"])
                if e["type"] == "hometeam.ConversationAssigned":
                    assigned[e["data"]["conversation_id"]].add(e["id"])
            assert len(added) == TOTAL and all(len(ids) == 1 for ids in added.values())
            assert len(assigned) == CUSTOMERS and all(len(ids) == 1 for ids in assigned.values())
            assert Counter(len(v) for v in added.values()) == Counter({1: TOTAL})

            # KPIs: every inbound line and every first placement counted exactly once, though
            # events may have been published (and consumed) twice.
            async def counted() -> dict[str, float]:
                sums: Counter[str] = Counter()
                async for bucket in db["kpi_buckets"].find({}):
                    for _, counters in agent_counters(bucket):
                        sums.update({k: v for k, v in counters.items() if k in ("messages_inbound", "routed")})
                return dict(sums)

            async def kpis_complete() -> dict[str, float] | None:
                sums = await counted()
                return sums if sums.get("messages_inbound", 0) >= TOTAL and sums.get("routed", 0) >= CUSTOMERS else None

            await eventually(kpis_complete, timeout_s=60, what=f"{TOTAL} inbound lines and {CUSTOMERS} placements counted")
            await asyncio.sleep(6)  # one more store of the metrics state (every 5 s): nothing more may come
            assert await counted() == {"messages_inbound": TOTAL, "routed": CUSTOMERS}
    finally:
        for p in processes.values():
            p.stop()
        await client.drop_database(db_name)
        await client.close()
        await delete_topics_with_prefix(infra.kafka, prefix)
