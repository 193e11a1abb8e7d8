"""Pool documents (``pools`` collection): one per pool, written only by the consumer that owns
the pool's partition, with the offsets of the commands already applied to it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pymongo import ReplaceOne
from pymongo.asynchronous.database import AsyncDatabase

from shared.runtime.store import bulk_write_chunked, find_by_ids

from shared.contracts.agents import Presence
from shared.contracts.common import Channel, RoutingReason, WaitingOn

from services.team_routing.pool import AgentPresenceState, Placement, PoolState


def pool_to_doc(state: PoolState) -> dict[str, Any]:
    return {
        "_id": state.pool_id,
        "agents": {a: {"presence": s.presence.value, "idle_since": s.idle_since} for a, s in state.agents.items()},
        "placements": [
            {
                "conversation_id": p.conversation_id,
                "customer_id": p.customer_id,
                "agent_id": p.agent_id,
                "waiting_on": p.waiting_on.value,
                "priority": p.priority,
                "enqueued_at": p.enqueued_at,
                "pool_reason": p.pool_reason.value,
                "known_agent_id": p.known_agent_id,
                "known_agent_served_at": p.known_agent_served_at,
                "assigned_at": p.assigned_at,
                "home_team_id": p.home_team_id,
                "channel": p.channel.value,
                "opted_out": p.opted_out,
            }
            for p in state.placements.values()
        ],
        # Offsets are stored as a list: topic names contain dots, which MongoDB field names
        # must not.
        "applied": [{"key": k, "offset": v} for k, v in state.applied.items()],
        "surging": state.surging,
    }


def pool_from_doc(doc: dict[str, Any]) -> PoolState:
    return PoolState(
        pool_id=doc["_id"],
        agents={
            a: AgentPresenceState(presence=Presence(s["presence"]), idle_since=s["idle_since"])
            for a, s in doc.get("agents", {}).items()
        },
        placements={
            p["conversation_id"]: Placement(
                conversation_id=p["conversation_id"],
                customer_id=p["customer_id"],
                agent_id=p.get("agent_id"),
                waiting_on=WaitingOn(p["waiting_on"]),
                priority=p.get("priority", 0),
                enqueued_at=p["enqueued_at"],
                pool_reason=RoutingReason(p["pool_reason"]),
                known_agent_id=p.get("known_agent_id"),
                known_agent_served_at=p.get("known_agent_served_at"),
                assigned_at=p.get("assigned_at"),
                home_team_id=p.get("home_team_id"),
                channel=Channel(p.get("channel", "app")),
                opted_out=p.get("opted_out", False),
            )
            for p in doc.get("placements", [])
        },
        applied={a["key"]: a["offset"] for a in doc.get("applied", [])},
        surging=doc.get("surging", False),
    )


class PoolStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.pools = db["pools"]
        self.checkpoints = db["pool_checkpoints"]  # see shared.runtime.checkpoints

    async def load(self, pool_ids: Iterable[str]) -> dict[str, PoolState]:
        """These pools' stored states (a pool never stored starts empty)."""
        ids = list(dict.fromkeys(pool_ids))
        states = {pid: PoolState(pool_id=pid) for pid in ids}
        for pool_id, doc in (await find_by_ids(self.pools, ids)).items():
            states[pool_id] = pool_from_doc(doc)
        return states

    async def save_docs(self, docs: Iterable[dict[str, Any]]) -> None:
        ops = [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs]
        if ops:
            await bulk_write_chunked(self.pools, ops)
