"""The job API: submit now and read later, resume a stream, look, cancel.

``POST /v1/jobs`` takes a chat body (``messages``) or a completion body (``prompt``) and answers
at once with the job id. ``GET /v1/jobs/{id}/events`` streams the same chunks the matching
streaming endpoint would, each with an ``id:`` line; ``Last-Event-ID`` resumes after that event,
on any gateway. A job id belongs to its tenant: anyone else gets 404.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway.auth import tenant_of
from gateway.openapi import json_body
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.state import GatewayState, gateway_state
from gateway.streaming import new_dispatch, stream_response, writer_for
from gateway.submit import accept, enqueue_now
from shared.errors import InvalidRequest, NotFound
from shared.models import DoneEvent, ErrorEvent, Job, JobState, TokenEvent

router = APIRouter()


async def find_job(state: GatewayState, request: Request, job_id: str) -> Job:
    model = await state.store.model_of(job_id) if len(job_id) <= 64 else None
    job = await state.store.load_job(model, job_id) if model else None
    if job is None or job.tenant != tenant_of(request):
        raise NotFound(f"no job {job_id!r}", param="id", code="job_not_found")
    return job


@router.post(
    "/v1/jobs",
    status_code=202,
    openapi_extra=json_body(ChatCompletionRequest, CompletionRequest),
)
async def submit_job(request: Request) -> JSONResponse:
    accepted = await accept(request, None)
    job, existed = await enqueue_now(request, accepted)
    body = {"id": job.id, "object": "slipstream.job", "model": job.model, "status": "queued"}
    return JSONResponse(body, status_code=200 if existed else 202, headers=accepted.headers(job))


@router.get("/v1/jobs/{job_id}/events")
async def job_events(request: Request, job_id: str) -> Response:
    state = gateway_state(request)
    job = await find_job(state, request, job_id)
    after = last_event_id(request)
    dispatch = new_dispatch(state, job, submit=False, cancel_on_exit=False, after=after)
    headers = {"X-Request-Id": job.request_id, "X-Slipstream-Job-Id": job.id}
    writer = writer_for(job, resumed=after > 0)
    return await stream_response(state, dispatch, writer, headers, early_errors_as_status=False)


def last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if raw is None or raw == "":
        return 0
    if not raw.isdigit() or len(raw) > 18:
        raise InvalidRequest("Last-Event-ID must be a non-negative integer", param="Last-Event-ID")
    return int(raw)


@router.get("/v1/jobs/{job_id}")
async def get_job(request: Request, job_id: str) -> dict[str, Any]:
    state = gateway_state(request)
    job = await find_job(state, request, job_id)
    fields = await state.store.state(job.model, job.id)
    text: list[str] = []
    result: dict[str, Any] = {}
    for entry in await state.store.read_log(job.model, job.id):
        for event in entry.batch.events:
            if isinstance(event, TokenEvent):
                text.append(event.x)
            elif isinstance(event, DoneEvent):
                result["usage"] = event.usage.model_dump() | {
                    "total_tokens": event.usage.total_tokens
                }
                result["finish_reason"] = event.finish_reason
            elif isinstance(event, ErrorEvent):
                result["error"] = {"code": event.code, "message": event.message}
    if fields.get("aff"):
        result["affinity"] = {
            "outcome": fields["aff"],
            "wait_ms": int(fields.get("aff_wait", 0)),  # held for its warm worker
            "claimed_after_ms": int(fields.get("aff_picked", 0)),  # from reservation to claim
            "target": fields.get("aff_target") or None,
            "worker": fields.get("owner"),
        }
    if fields.get("state") == "queued":
        place = await state.admission.position(job.ref())
        if place is not None:
            result["queue"] = {"position": place.position, "eta_ms": place.eta_ms}
    return {
        "id": job.id,
        "object": "slipstream.job",
        "model": job.model,
        "kind": job.kind,
        "priority": job.priority.value,
        "status": fields.get("state", "unknown"),
        "created": job.enqueued_at_ms // 1000,
        "deliveries": int(fields.get("deliveries", 0)),
        "output": "".join(text),
        "last_event_id": int(fields.get("seq", 0)),
        **result,
    }


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    state = gateway_state(request)
    job = await find_job(state, request, job_id)
    after = await state.store.cancel(job.model, job.id, message="cancelled through the job API")
    return {"id": job.id, "object": "slipstream.job", "status": JobState(after).value}
