"""``GET /dashboard``: a live page (plain HTML, CSS and canvas JS served from the package).

The page polls ``GET /dashboard/data`` every second. That JSON is read back from the same
Prometheus registry ``/metrics`` renders (after the same cluster refresh), so the two agree.
Every path here is an operator endpoint (``gateway.auth.require_operator``): with auth on, the
browser is asked for a ``metrics`` or ``admin`` key (the Basic auth password) once, then sends
it with the page's polls.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from gateway.auth import require_operator
from gateway.cluster import ClusterSnapshot, refresh_cluster
from gateway.state import gateway_state
from shared.errors import NotFound

router = APIRouter(dependencies=[Depends(require_operator)])
STATIC = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
NO_CACHE = {"Cache-Control": "no-cache"}
Samples = dict[str, list[tuple[dict[str, str], float]]]


def _static(name: str) -> bytes:
    return resources.files("gateway").joinpath("static", name).read_bytes()


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> Response:
    return Response(_static("dashboard.html"), media_type="text/html", headers=NO_CACHE)


@router.get("/dashboard/static/{name}", include_in_schema=False)
async def dashboard_static(name: str) -> Response:
    if name not in STATIC:
        raise NotFound(f"no dashboard file {name!r}")
    return Response(_static(name), media_type=STATIC[name], headers=NO_CACHE)


@router.get("/dashboard/data", include_in_schema=False)
async def dashboard_data(request: Request) -> dict[str, Any]:
    state = gateway_state(request)
    snap = await refresh_cluster(state)
    samples = state.metrics.samples()
    return {
        "time": time.time(),
        "redis_ok": snap is not None,
        "draining": state.draining,
        "gateway": _gateway(samples),
        "models": _models(samples),
        "workers": _workers(snap),
        "recent": list(reversed(state.metrics.recent)),
    }


def _total(samples: Samples, name: str) -> float:
    return sum(value for _, value in samples.get(name, []))


def _gateway(samples: Samples) -> dict[str, Any]:
    by_outcome: dict[str, float] = {}
    for labels, value in samples.get("slipstream_gateway_requests_total", []):
        by_outcome[labels["outcome"]] = by_outcome.get(labels["outcome"], 0) + value
    return {
        "requests_total": _total(samples, "slipstream_gateway_requests_total"),
        "requests_by_outcome": by_outcome,
        "in_flight_requests": _total(samples, "slipstream_gateway_in_flight_requests"),
        "open_streams": _total(samples, "slipstream_gateway_open_streams"),
        "streamed_tokens_total": _total(samples, "slipstream_gateway_streamed_tokens_total"),
        "prompt_tokens_total": _total(samples, "slipstream_gateway_prompt_tokens_total"),
        "cached_tokens_total": _total(samples, "slipstream_gateway_prompt_cached_tokens_total"),
        "admission_rejections_total": _total(
            samples, "slipstream_gateway_admission_rejections_total"
        ),
    }


QUEUE_FIELDS = {
    "slipstream_queue_length": "length",
    "slipstream_queue_lag": "lag",
    "slipstream_queue_pending": "pending",
    "slipstream_queue_waiting_jobs": "waiting_jobs",
    "slipstream_queue_waiting_tokens": "waiting_tokens",
}
WORKER_FIELDS = {"id", "host", "model", "engine", "capacity_tokens", "tokens_in_use", "max_seqs"}
WORKER_FIELDS |= {"seqs_in_use", "tokens_per_s", "healthy", "draining", "heartbeat_at_ms"}
MODEL_FIELDS = {
    "slipstream_live_workers": "workers",
    "slipstream_capacity_tokens": "capacity_tokens",
    "slipstream_tokens_in_use": "tokens_in_use",
    "slipstream_tokens_per_second": "tokens_per_s",
}


def _models(samples: Samples) -> list[dict[str, Any]]:
    models: dict[str, dict[str, Any]] = {}
    for name, field in MODEL_FIELDS.items():
        for labels, value in samples.get(name, []):
            models.setdefault(labels["model"], {"model": labels["model"], "queues": {}})
            models[labels["model"]][field] = value
    for name, field in QUEUE_FIELDS.items():
        for labels, value in samples.get(name, []):
            model = models.setdefault(labels["model"], {"model": labels["model"], "queues": {}})
            model["queues"].setdefault(labels["priority"], {})[field] = value
    return [models[m] for m in sorted(models)]


def _workers(snap: ClusterSnapshot | None) -> list[dict[str, Any]]:
    if snap is None:
        return []
    return [w.model_dump(include=WORKER_FIELDS) for w in snap.workers]
