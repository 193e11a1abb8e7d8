"""``pools.status.v1``: a pool's queue and staffing after team-routing changed it. Keyed by
pool id; read by the metrics service and dashboards."""

from __future__ import annotations

from pydantic import AwareDatetime, Field

from shared.contracts.common import Identifier, PoolKind
from shared.contracts.envelope import InboundModel


class PoolStatusChanged(InboundModel):
    pool_id: Identifier
    kind: PoolKind
    queue_depth: int = Field(ge=0)
    oldest_waiting_since: AwareDatetime | None = None
    agents_online: int = Field(ge=0)
    capacity_online: float = Field(ge=0, description="Sum of max concurrency of online agents")
    load: float = Field(ge=0, description="Sum of conversation weights assigned to agents")
    surging: bool = False
    at: AwareDatetime
