"""``GET /v1/models``: the models live workers serve right now."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from gateway.auth import allows_model
from gateway.state import gateway_state
from shared.fleet import live_workers

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = gateway_state(request)
    workers = await live_workers(state.redis, state.keys, state.settings.worker_ttl_s)
    first_seen: dict[str, int] = {}
    for w in (w for w in workers if allows_model(request, w.model)):
        first_seen[w.model] = min(first_seen.get(w.model, w.started_at_ms), w.started_at_ms)
    return {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": t // 1000, "owned_by": "slipstream"}
            for m, t in sorted(first_seen.items())
        ],
    }
