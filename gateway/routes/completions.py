"""``POST /v1/chat/completions`` and ``POST /v1/completions``: submit, then relay or collect.

These two are served as plain Starlette routes (``ROUTES``), not FastAPI ``APIRoute``s: an open
stream keeps its whole call stack alive, and FastAPI's per-request dependency layer (exit
stacks, dependency solving) would add about 6 KB to every open stream and a tenth of a
millisecond to every request. They take no parameters FastAPI would parse anyway (the body is
read by hand), so the only dependency, ``authenticate``, is called directly. ``documented``
describes them to the OpenAPI document; it is never mounted.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.routing import Route

from gateway.auth import authenticate
from gateway.idempotency import claim_idempotency_key
from gateway.openapi import json_body
from gateway.request_context import bind_job
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.streaming import collect_response, new_dispatch, stream_response, writer_for
from gateway.submit import Kind, accept
from shared.errors import InvalidRequest


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


async def generate(request: Request, kind: Kind) -> Response:
    accepted = await accept(request, kind, follow=True)
    state, job, stream = accepted.state, accepted.job, accepted.stream
    cancel = cancel_on_disconnect(request)  # a 400 before the key is bound to the job
    existing, binding = await claim_idempotency_key(state, request, job)
    submit = existing is None
    if existing is not None:
        job = existing
    headers = accepted.headers(job)
    cancel = cancel and submit
    dispatch = new_dispatch(state, job, submit=submit, cancel_on_exit=cancel)
    bind_job(job)
    observer = dispatch.observer = state.metrics.observe(dispatch.job, stream=stream, timed=submit)
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
