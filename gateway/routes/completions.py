"""``POST /v1/chat/completions`` and ``POST /v1/completions``: submit, then relay or collect."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from gateway.dispatch import Dispatch
from gateway.intake import build_job, parse, read_json
from gateway.openai_format import ChunkWriter, completion_object
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.state import GatewayState, gateway_state
from shared.errors import JobFailed, ModelNotFound, ShuttingDown
from shared.fleet import known_models
from shared.models import DoneEvent, ErrorEvent, Event, Job, TokenEvent

router = APIRouter()
Kind = Literal["chat", "completion"]


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await generate(request, "chat")


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await generate(request, "completion")


async def generate(request: Request, kind: Kind) -> Response:
    state = gateway_state(request)
    if state.draining:
        raise ShuttingDown("the gateway is shutting down; retry on another replica")
    data = await read_json(request, state.settings.max_body_bytes)
    body: ChatCompletionRequest | CompletionRequest = (
        parse(ChatCompletionRequest, data) if kind == "chat" else parse(CompletionRequest, data)
    )
    job = build_job(request, body, state.settings)
    await ensure_known_model(state, job.model)
    headers = {"X-Request-Id": job.request_id, "X-Slipstream-Job-Id": job.id}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    writer = ChunkWriter(kind, response_id(kind, job.id), job.model, include_usage)
    dispatch = new_dispatch(state, job)
    if body.stream:
        return await stream_response(state, dispatch, writer, headers)
    return await collect_response(request, dispatch, writer, headers)


def response_id(kind: Kind, job_id: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + job_id


def new_dispatch(state: GatewayState, job: Job, *, submit: bool = True, after: int = 0) -> Dispatch:
    s = state.settings
    return Dispatch(
        state.store,
        state.mux,
        job,
        worker_wait_s=s.worker_wait_s,
        stall_timeout_s=s.stall_timeout_s,
        worker_ttl_s=s.worker_ttl_s,
        submit=submit,
        after_seq=after,
    )


async def ensure_known_model(state: GatewayState, model: str) -> None:
    if model in state.settings.models or model in await known_models(state.redis, state.keys):
        return
    raise ModelNotFound(f"the model {model!r} does not exist", param="model")


def first_error(events: list[Event]) -> ErrorEvent | None:
    return next((e for e in events if isinstance(e, ErrorEvent)), None)


def raise_for(event: ErrorEvent, headers: dict[str, str]) -> None:
    error = JobFailed(event.message, status=event.status, code=event.code)
    error.headers = headers
    raise error


async def close_dispatch(dispatch: Dispatch) -> None:
    """Leave the job (cancelling it if unfinished) even while our own task is cancelled."""
    with anyio.CancelScope(shield=True):
        await dispatch.__aexit__(None, None, None)


async def stream_response(
    state: GatewayState, dispatch: Dispatch, writer: ChunkWriter, headers: dict[str, str]
) -> Response:
    """SSE once the job starts (or after ``stream_start_s`` queued); a status code before."""
    await dispatch.__aenter__()
    try:
        first = await dispatch.next(timeout=state.settings.stream_start_s)
        error = first_error(first)
        if error is not None:
            raise_for(error, headers)
    except BaseException:
        await close_dispatch(dispatch)
        raise
    return EventSourceResponse(
        relay(state, dispatch, writer, first),
        headers=headers,
        ping=int(state.settings.sse_ping_s),
        send_timeout=state.settings.send_timeout_s,
        sep="\n",
    )


async def relay(
    state: GatewayState, dispatch: Dispatch, writer: ChunkWriter, first: list[Event]
) -> AsyncIterator[bytes]:
    state.open_streams.add(dispatch.job.id)
    try:
        if first:
            yield writer.frames(first)
        while not dispatch.finished:
            events = await dispatch.next(timeout=5.0)
            if events:
                yield writer.frames(events)
    finally:
        state.open_streams.discard(dispatch.job.id)
        await close_dispatch(dispatch)


async def collect_response(
    request: Request, dispatch: Dispatch, writer: ChunkWriter, headers: dict[str, str]
) -> Response:
    """Wait for the whole output; a client that disconnects meanwhile cancels the job."""
    parts: list[str] = []
    outcome: list[DoneEvent | ErrorEvent] = []

    async def collect() -> None:
        while not dispatch.finished:
            for event in await dispatch.next(timeout=5.0):
                if isinstance(event, TokenEvent):
                    parts.append(event.x)
                elif isinstance(event, DoneEvent | ErrorEvent):
                    outcome.append(event)
        tg.cancel_scope.cancel()

    async def watch_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        tg.cancel_scope.cancel()

    await dispatch.__aenter__()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect)
            tg.start_soon(watch_disconnect)
    finally:
        await close_dispatch(dispatch)
    if not outcome:
        return Response(status_code=499, headers=headers)  # the client is gone
    end = outcome[0]
    if isinstance(end, ErrorEvent):
        raise_for(end, headers)
    assert isinstance(end, DoneEvent)
    body = completion_object(
        writer.kind, writer.response_id, writer.model, "".join(parts), end, writer.created
    )
    return JSONResponse(body, headers=headers)
