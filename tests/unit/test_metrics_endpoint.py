"""``/metrics`` serves everything, or only the samples named with ``name[]`` (as
prometheus_client's own handler does): a reader after one gauge every second does not pay for
the whole exposition."""

from __future__ import annotations

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.applications import Starlette

from shared.runtime.http import health_routes


async def test_metrics_serves_only_the_named_samples_when_asked() -> None:
    registry = CollectorRegistry()
    Gauge("hometeam_state_unstored_records", "Unstored.", ["state"], registry=registry).labels("customers").set(7)
    Counter("hometeam_records_published", "Published.", registry=registry).inc(3)
    app = Starlette(routes=list(health_routes(registry, {})))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as http:
        everything = (await http.get("/metrics")).text
        named = await http.get("/metrics", params={"name[]": "hometeam_state_unstored_records"})
    assert 'hometeam_state_unstored_records{state="customers"} 7.0' in everything
    assert "hometeam_records_published_total 3.0" in everything
    assert named.status_code == 200
    assert 'hometeam_state_unstored_records{state="customers"} 7.0' in named.text
    assert "hometeam_records_published" not in named.text
