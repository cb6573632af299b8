"""GET /health (is Redis reachable; how many workers are live) and GET /metrics (Prometheus). No key needed."""
from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from spool.gateway.core import gateway_of

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    """200 when Redis answers a PING within 2 s (the gateway can take requests), else 503."""
    gw = gateway_of(request)
    try:
        await asyncio.wait_for(gw.redis.ping(), timeout=2.0)
        ok, error = True, None
    except Exception as e:  # noqa: BLE001 - any failure to reach Redis makes this gateway unhealthy
        ok, error = False, f"{type(e).__name__}: {e}"
    body = {"status": "ok" if ok else "unavailable", "redis": "ok" if ok else error,
            "workers": len(gw.deployment.workers), "models": gw.deployment.models(),
            "backlog": gw.deployment.backlog}
    return Response(orjson.dumps(body), status_code=200 if ok else 503, media_type="application/json")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """The gateway's Prometheus metrics."""
    gw = gateway_of(request)
    gw.metrics.live_workers.set(len(gw.deployment.workers))
    for priority, n in gw.deployment.backlog.items():
        gw.metrics.backlog.labels(priority).set(n)
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)
