"""``GET /v1/models`` and ``GET /v1/models/{model}``: the models live workers serve right now.

A model object carries ``max_model_len`` (the context length, as vLLM reports it) when its
live workers say what it is: the smallest they report, the one every worker can serve.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from gateway.auth import allows_model
from gateway.state import gateway_state
from shared.errors import NotFound
from shared.fleet import live_workers

router = APIRouter()


async def served_models(request: Request) -> dict[str, dict[str, Any]]:
    """Model id -> its OpenAI model object, for the models this caller may use."""
    state = gateway_state(request)
    workers = await live_workers(state.redis, state.keys, state.settings.worker_ttl_s)
    models: dict[str, dict[str, Any]] = {}
    for w in (w for w in workers if allows_model(request, w.model)):
        created = w.started_at_ms // 1000
        obj = models.setdefault(
            w.model,
            {"id": w.model, "object": "model", "created": created, "owned_by": "slipstream"},
        )
        obj["created"] = min(obj["created"], created)
        if w.context_tokens > 0:
            obj["max_model_len"] = min(obj.get("max_model_len", w.context_tokens), w.context_tokens)
    return models


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    models = await served_models(request)
    return {"object": "list", "data": [models[m] for m in sorted(models)]}


@router.get("/v1/models/{model:path}")
async def retrieve_model(request: Request, model: str) -> dict[str, Any]:
    models = await served_models(request)
    if model not in models:
        raise NotFound(
            f"no live worker serves model {model!r}", param="model", code="model_not_found"
        )
    return models[model]
