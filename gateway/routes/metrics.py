"""``GET /metrics``: Prometheus text format, cluster gauges read from Redis at scrape time.

An operator endpoint: with auth on it needs a key with the ``metrics`` or ``admin`` scope
(``gateway.auth.require_operator``); Prometheus sends it as a bearer token.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.auth import require_operator
from gateway.cluster import refresh_cluster
from gateway.state import gateway_state

router = APIRouter(dependencies=[Depends(require_operator)])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    state = gateway_state(request)
    await refresh_cluster(state)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
