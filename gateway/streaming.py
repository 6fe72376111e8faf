"""Turning a ``Dispatch`` into an HTTP response: an SSE relay, or one collected JSON body.

Shared by the OpenAI routes and the job API, so a resumed stream renders exactly the chunks
the original one did. A stream cut by the gateway's own shutdown never cancels its job: the
client resumes it elsewhere with ``Last-Event-ID``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import anyio
import structlog
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from gateway.dispatch import Dispatch
from gateway.inline_relay import EVENTS_PER_WRITE, InlineRelay
from gateway.job_events import LOG_GONE
from gateway.openai_format import ChunkWriter, completion_object
from gateway.sse import SSEResponse, StreamCut
from gateway.state import GatewayState
from shared.errors import JobFailed
from shared.models import DoneEvent, ErrorEvent, Event, Job, TokenEvent

log = structlog.get_logger("slipstream.gateway")


def new_dispatch(
    state: GatewayState,
    job: Job,
    *,
    submit: bool = True,
    cancel_on_exit: bool = True,
    after: int = 0,
) -> Dispatch:
    s = state.settings
    return Dispatch(
        state.store,
        state.mux,
        job,
        worker_wait_s=s.worker_wait_s,
        stall_timeout_s=s.stall_timeout_s,
        worker_ttl_s=s.worker_ttl_s,
        submit=submit,
        cancel_on_exit=cancel_on_exit,
        after_seq=after,
        clock=state.admission.clock,
        serves=state.admission.serves,
    )


def writer_for(job: Job, *, resumed: bool = False) -> ChunkWriter:
    prefix = "chatcmpl-" if job.kind == "chat" else "cmpl-"
    writer = ChunkWriter(
        job.kind, prefix + job.id, job.model, job.include_usage, created=job.enqueued_at_ms // 1000
    )
    writer.continuous_usage = job.continuous_usage
    writer.role_sent = resumed
    return writer


def raise_for(event: ErrorEvent, headers: dict[str, str]) -> None:
    error = JobFailed(event.message, status=event.status, code=event.code)
    error.headers = headers
    raise error


async def close_dispatch(dispatch: Dispatch, *, cancel: bool = True) -> None:
    """Leave the job (cancelling it if unfinished and ``cancel``), even while cancelled."""
    if not cancel:
        dispatch.cancel_on_exit = False
    with anyio.CancelScope(shield=True):
        await dispatch.close()


async def stream_response(
    state: GatewayState,
    dispatch: Dispatch,
    writer: ChunkWriter,
    headers: dict[str, str],
    *,
    early_errors_as_status: bool = True,
) -> Response:
    """SSE once the job starts (or after ``stream_start_s`` queued).

    An error before that becomes the response's status (504, 503...) when
    ``early_errors_as_status``; a reader of an existing job gets it as an SSE error event.
    """
    await dispatch.open()
    try:
        first = await dispatch.next(timeout=state.settings.stream_start_s)
        error = next((e for e in first if isinstance(e, ErrorEvent)), None)
        if error is not None and (early_errors_as_status or error.code == LOG_GONE):
            raise_for(error, headers)
    except BaseException:
        await close_dispatch(dispatch)
        raise
    outlet = InlineRelay(dispatch, writer, StreamCut(), state.settings.send_timeout_s)
    return SSEResponse(
        relay(state, first, outlet),
        headers=headers,
        outlet=outlet,
        deadlines=state.mux.deadlines,
    )


async def relay(
    state: GatewayState, first: list[Event], outlet: InlineRelay
) -> AsyncIterator[bytes]:
    """The stream's frames. While it waits, plain tokens go out inline (``InlineRelay``), so
    once the job runs it wakes only for a ping, a limit or anything out of the ordinary."""
    ping_s, every = state.settings.sse_ping_s, state.settings.progress_s
    quiet_since = note_at = time.monotonic()
    dispatch, writer, cut = outlet.dispatch, outlet.writer, outlet.cut
    listener = dispatch.events.listener
    assert listener is not None
    listener.sink = outlet
    state.open_streams.add(dispatch.job.id)
    try:
        for frame in frames_of(first, writer, dispatch, cut):
            yield frame
        # the events a stream has sent are not kept through its next wait: a stream waits
        # most of its life, and there may be 10,000 (~0.7 KB of models each)
        del first
        while not dispatch.finished:
            if not dispatch.started and time.monotonic() >= note_at:
                # still queued: ": queued position=N eta_ms=M" (an SSE comment), at 1, 2, 4...
                # progress periods up to the ping period: each costs Redis a scan of the queue,
                # and thousands of queued streams asking every second starved the pool
                if note := await state.admission.progress(dispatch.job):
                    yield note
                    quiet_since = time.monotonic()
                note_at, every = time.monotonic() + every, min(every * 2, ping_s)
            quiet_since = max(quiet_since, outlet.written_at)  # frames written inline count
            wait = quiet_since + ping_s - time.monotonic()
            if not dispatch.started:  # queued: back for the next progress note, not before
                wait = min(wait, note_at - time.monotonic())
            # a frame written inline moves the next ping on: no wake-up to find that out
            events = await dispatch.next(timeout=max(wait, 0.0), slide=ping_s)
            for frame in frames_of(events, writer, dispatch, cut):
                yield frame
            if events:
                quiet_since = time.monotonic()
            elif max(quiet_since, outlet.written_at) + ping_s <= time.monotonic():
                yield b": ping\n\n"  # keeps proxies and load balancers from closing the stream
                quiet_since = time.monotonic()
            del events
    finally:
        listener.sink = None
        state.open_streams.discard(dispatch.job.id)
        keep = cut.too_slow or state.draining  # cut by us: the client resumes elsewhere
        await close_dispatch(dispatch, cancel=not keep)


def frames_of(
    events: list[Event], writer: ChunkWriter, dispatch: Dispatch, cut: StreamCut
) -> Iterator[bytes]:
    """The SSE frames for ``events``; the one that ends the job is flagged as the last."""
    parts = chunks(events)
    for i, chunk in enumerate(parts):
        cut.last_frame = dispatch.finished and i == len(parts) - 1
        yield writer.frames(chunk)


def chunks(events: list[Event], size: int = EVENTS_PER_WRITE) -> list[list[Event]]:
    """At most ``size`` events per write, so a reader that stops reading blocks the next send
    (and is cut after ``send_timeout_s``) instead of piling output up in the gateway."""
    if len(events) <= size:  # nearly always: one write, no copy
        return [events] if events else []
    return [events[i : i + size] for i in range(0, len(events), size)]


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

    await dispatch.open()
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
