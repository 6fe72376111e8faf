"""``GET /metrics``: Prometheus text format, cluster gauges read from Redis at scrape time.

An operator endpoint: with auth on it needs a key with the ``metrics`` or ``admin`` scope
(``gateway.auth.require_operator``); Prometheus sends it as a bearer token.
"""

from __future__ import annotations

import asyncio

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from gateway.auth import require_operator
from gateway.cluster import ClusterSnapshot, read_cluster
from gateway.state import GatewayState, gateway_state
from shared.errors import Overloaded, SlipstreamError

router = APIRouter(dependencies=[Depends(require_operator)])
log = structlog.get_logger("slipstream.gateway")
CLUSTER_READ_TIMEOUT_S = 2.0


async def refresh_cluster(state: GatewayState) -> ClusterSnapshot | None:
    """Read the cluster and set the gauges from it; None (gauges left as they were) on error.

    The read awaits; setting the gauges and rendering after it do not, so a scrape never sees
    half of one snapshot and half of another.
    """
    try:
        snap = await asyncio.wait_for(
            read_cluster(
                state.redis,
                state.keys,
                worker_ttl_s=state.settings.worker_ttl_s,
                models=state.settings.models,
            ),
            CLUSTER_READ_TIMEOUT_S,
        )
    except (RedisError, OSError, TimeoutError) as exc:
        state.metrics.cluster_errors.inc()
        log.warning("cluster_read_failed", error=str(exc) or type(exc).__name__)
        return None
    state.metrics.apply_cluster(snap)
    return snap


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    state = gateway_state(request)
    await refresh_cluster(state)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def note_rejection(request: Request, exc: SlipstreamError) -> None:
    """Count an admission refusal (any 429) leaving the gateway, by model and reason."""
    state = getattr(request.state, "gateway", None)
    if isinstance(exc, Overloaded) and isinstance(state, GatewayState):
        model = getattr(request.state, "model", None)
        state.metrics.rejected(model if isinstance(model, str) else "unknown", exc.code)
