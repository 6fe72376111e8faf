"""``POST /v1/chat/completions`` and ``POST /v1/completions``: submit, then relay or collect.

These two are served as plain Starlette routes (``ROUTES``), not FastAPI ``APIRoute``s: an open
stream keeps its whole call stack alive, and FastAPI's per-request dependency layer (exit
stacks, dependency solving) would add about 6 KB to every open stream and a tenth of a
millisecond to every request. They take no parameters FastAPI would parse anyway (the body is
read by hand), so the only dependency, ``authenticate``, is called directly. ``documented``
describes them to the OpenAPI document; it is never mounted.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.routing import Route

from gateway.auth import api_key_of, authenticate, authorize, tenant_of
from gateway.idempotency import claim_idempotency_key
from gateway.intake import build_job, parse, read_json
from gateway.openapi import json_body
from gateway.request_context import bind_job
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.state import GatewayState, gateway_state
from gateway.streaming import collect_response, new_dispatch, stream_response, writer_for
from shared.errors import InvalidRequest, ModelNotFound, ShuttingDown
from shared.fleet import known_models
from shared.models import Job

Kind = Literal["chat", "completion"]


async def chat_completions(request: Request) -> Response:
    await authenticate(request)
    return await generate(request, "chat")


async def completions(request: Request) -> Response:
    await authenticate(request)
    return await generate(request, "completion")


ROUTES = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
]

documented = APIRouter()
documented.add_api_route(
    "/v1/chat/completions",
    chat_completions,
    methods=["POST"],
    openapi_extra=json_body(ChatCompletionRequest),
)
documented.add_api_route(
    "/v1/completions", completions, methods=["POST"], openapi_extra=json_body(CompletionRequest)
)


async def accept(request: Request, kind: Kind | None) -> tuple[GatewayState, Job, bool]:
    """Validate and admit a request; returns the job and whether the client wants a stream.

    ``kind=None`` (the job API) decides by the body: ``messages`` is chat, else completion.
    """
    state = gateway_state(request)
    if state.draining:
        raise ShuttingDown("the gateway is shutting down; retry on another replica")
    data = await read_json(request, state.settings.max_body_bytes)
    if kind is None:
        kind = "chat" if "messages" in data else "completion"
    body: ChatCompletionRequest | CompletionRequest = (
        parse(ChatCompletionRequest, data) if kind == "chat" else parse(CompletionRequest, data)
    )
    request.state.model = body.model  # labels an admission rejection's metric
    job = build_job(
        request,
        body,
        state.settings,
        tenant=tenant_of(request),
        now_ms=state.admission.clock.now_ms(),
    )
    options = body.stream_options
    job.include_usage = bool(options and (options.include_usage or options.continuous_usage_stats))
    job.continuous_usage = bool(options and options.continuous_usage_stats)
    authorize(request, job)  # 403 for a model the key may not use; priority ceiling
    await ensure_known_model(state, job.model)
    await state.admission.check(job)  # 400 context / 429 deadline or queue full
    request.state.rate_headers = await state.limits.charge(api_key_of(request), job)  # 429
    state.admission.admit(job)  # counted only once every gate passed
    return state, job, body.stream


async def generate(request: Request, kind: Kind) -> Response:
    state, job, stream = await accept(request, kind)
    existing, binding = await claim_idempotency_key(state, request, job)
    submit = existing is None
    if existing is not None:
        job = existing
    headers = {"X-Request-Id": job.request_id, "X-Slipstream-Job-Id": job.id}
    headers.update(request.state.rate_headers)
    cancel = cancel_on_disconnect(request) and submit
    dispatch = new_dispatch(state, job, submit=submit, cancel_on_exit=cancel)
    bind_job(job)
    observer = dispatch.observer = state.metrics.observe(job, stream=stream, timed=submit)
    writer = writer_for(job)
    try:
        if stream:
            return await stream_response(state, dispatch, writer, headers)
        return await collect_response(request, dispatch, writer, headers)
    except BaseException:
        observer.on_exit(dispatch, error=True)  # a no-op when the dispatch recorded its end
        if binding is not None:
            await binding.release_unless_enqueued(state, job)
        raise


def cancel_on_disconnect(request: Request) -> bool:
    """``X-Cancel-On-Disconnect: false`` keeps the job running for a later resume."""
    value = request.headers.get("x-cancel-on-disconnect", "true").strip().lower()
    if value not in ("true", "false"):
        raise InvalidRequest(
            "X-Cancel-On-Disconnect must be true or false", param="X-Cancel-On-Disconnect"
        )
    return value == "true"


async def ensure_known_model(state: GatewayState, model: str) -> None:
    if model in state.settings.models or model in await known_models(state.redis, state.keys):
        return
    raise ModelNotFound(f"the model {model!r} does not exist", param="model")
