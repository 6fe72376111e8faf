"""``/healthz`` and ``/health`` (the process answers), ``/readyz`` (Redis answers, not draining)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from gateway.state import gateway_state

router = APIRouter()


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
        return JSONResponse({"status": "redis unreachable", "error": str(exc)}, status_code=503)
    return JSONResponse({"status": "ready"})
