"""``/healthz`` and ``/health`` (the process answers), ``/readyz`` (Redis answers, not draining).

The probes stay open with auth on (a kubelet or a load balancer presents no key), so they say
no more than ok / draining / Redis unreachable: why Redis is unreachable (its address, say)
goes to the log, not to whoever asks.
"""

from __future__ import annotations

import asyncio

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from gateway.state import gateway_state

router = APIRouter()
log = structlog.get_logger("slipstream.gateway")


@router.get("/healthz", include_in_schema=False)
@router.get("/health", include_in_schema=False)  # vLLM's name; GuideLLM probes it by default
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", include_in_schema=False)
async def readyz(request: Request) -> JSONResponse:
    state = gateway_state(request)
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    try:
        await asyncio.wait_for(state.redis.ping(), 2.0)
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("readyz_redis_unreachable", error=str(exc) or type(exc).__name__)
        return JSONResponse({"status": "redis unreachable"}, status_code=503)
    return JSONResponse({"status": "ready"})
