"""HTTP endpoints every service serves: ``/healthz``, ``/readyz`` and ``/metrics``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

ReadinessCheck = Callable[[], Awaitable[None]]


def health_routes(
    registry: CollectorRegistry, checks: dict[str, ReadinessCheck], timeout_s: float = 3.0
) -> Sequence[BaseRoute]:
    async def healthz(_: Request) -> Response:
        # Liveness: the process and its event loop answer. Dependencies are /readyz's job.
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        results: dict[str, str] = {}

        async def run(name: str, check: ReadinessCheck) -> None:
            try:
                await asyncio.wait_for(check(), timeout_s)
                results[name] = "ok"
            except Exception as exc:  # each failed check is reported, not raised
                results[name] = f"failed: {type(exc).__name__}"

        await asyncio.gather(*(run(n, c) for n, c in checks.items()))
        ready = all(v == "ok" for v in results.values())
        return JSONResponse(
            {"status": "ready" if ready else "not_ready", "checks": results},
            status_code=200 if ready else 503,
        )

    async def metrics(request: Request) -> Response:
        # ``?name[]=<sample name>`` (repeatable) serves only those, as prometheus_client's own
        # handler does: a reader after one gauge (the bench, every second) does not pay for the
        # whole exposition (~7 ms of the service's CPU for metrics under load).
        names = request.query_params.getlist("name[]")
        served = registry.restricted_registry(names) if names else registry
        return Response(generate_latest(served), media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]


def problem(status: int, reason: str, **extra: object) -> JSONResponse:
    """A 4xx/5xx answer with a machine-readable reason."""
    return JSONResponse({"error": reason, **extra}, status_code=status)


# Fine buckets for end-to-end latencies of the message path (seconds).
LATENCY_BUCKETS = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0,
)
