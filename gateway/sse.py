"""``SSEResponse``: server-sent events written straight to ASGI, lean per stream.

One task streams the frames; a second only waits for the client's disconnect. Pings come
from the frame source itself (it yields a comment when quiet), and the send timeout is a
deadline in the gateway's shared ``Deadlines`` wheel, armed once and moved by each write (not
a cancel scope or a timer handle per write: at 10,000 streams those were a measurable part of
the relay's CPU). A stream that outlives its reader or its send timeout is
cancelled from the outside and ends quietly; its frame source's cleanup decides what happens to
the job (``StreamCut``). Frames may also be written from outside the task, through the
stream's ``Outlet`` (the inline relay), under the ordering rule the ``Outlet`` states.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable

import structlog
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.multiplexer import Deadlines
from shared.aio import start_now

log = structlog.get_logger("slipstream.gateway")


# The server's own ``send`` for a request, under this scope key when the app is served through
# ``direct_send`` (``gateway/main.py``)
DIRECT_SEND = "slipstream.direct_send"


def direct_send(app: Starlette) -> ASGIApp:
    """``app`` with the server's ``send`` in each HTTP request's scope (``DIRECT_SEND``); serve
    it as ASGI 3 (``interface="asgi3"``: it is a plain function returning ``app``'s call).

    An SSE body frame passed through Starlette's middleware goes through three wrappers
    (``ServerErrorMiddleware``, ``ExceptionMiddleware`` and the route's exception handling),
    which only watch for the response's start: ~3 µs a frame of the relay's ~60. So
    ``SSEResponse`` sends its start through the middleware, as any response does, and its body
    frames straight to the server. That is only right when nothing in between touches response
    bodies (compressing or re-streaming them, as Starlette's ``BaseHTTPMiddleware`` does, or
    FastAPI's own telemetry, which waits for the body's end): each middleware the app adds
    must say it leaves them alone (``leaves_bodies = True``) and FastAPI's telemetry must be
    off, or ``app`` is served as it is. The middleware stack is built here, so one added later
    is refused (Starlette raises) rather than missed; route-level middleware and mounted apps
    are not looked at (the gateway has neither).

    Not an ``async def``: an open stream holds its whole call stack, so the wrapper hands
    ``app``'s call back instead of adding a frame of its own to every stream's stack.
    """
    if others := _touching_bodies(app):
        log.warning("direct_send_off", middleware=others)
        return app
    app.middleware_stack = app.build_middleware_stack()

    def served(scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] == "http":
            scope[DIRECT_SEND] = send
        return app(scope, receive, send)

    return served


def _touching_bodies(app: Starlette) -> list[str]:
    """What in ``app`` may see response bodies besides the server (empty: nothing)."""
    named = [m.cls for m in app.user_middleware if not getattr(m.cls, "leaves_bodies", False)]
    others = [getattr(c, "__name__", repr(c)) for c in named]
    telemetry = getattr(app, "_telemetry", None) or {}  # FastAPI's ``telemetry=`` argument
    if any(telemetry.get(k) for k in ("tracing", "metrics", "logs")):
        others.append("FastAPI telemetry")
    return others


class StreamCut:
    """How a stream ends: why it ended early (known to its frame source before its cleanup
    runs), or the frame source's word that the frame it yields next is its last (sent with
    the end of the body, saving a write)."""

    __slots__ = ("client_gone", "last_frame", "too_slow")

    def __init__(self) -> None:
        self.too_slow = False
        self.client_gone = False
        self.last_frame = False


class SendGuard:
    """One stream's send timeout in the shared ``Deadlines`` wheel: a write under way past
    ``send_by`` cuts the stream (``too_slow``). Armed at most once at a time: ``send_by`` only
    moves later, so when the entry comes due for an earlier write, it re-arms for the current
    one. Small on purpose, since an entry may outlive its stream by up to the send timeout."""

    __slots__ = ("armed", "cut", "deadlines", "send_by", "task")

    def __init__(self, deadlines: Deadlines, task: asyncio.Task[object], cut: StreamCut) -> None:
        self.deadlines = deadlines
        self.task: asyncio.Task[object] | None = task
        self.cut = cut
        self.send_by = 0.0  # while a write is under way: when it becomes too slow
        self.armed = False

    def start(self, timeout: float) -> None:
        self.send_by = time.monotonic() + timeout
        if not self.armed:
            self.armed = True
            self.deadlines.add(self.send_by, self)

    def expire(self, now: float) -> None:
        self.armed = False
        if not self.send_by or self.task is None:
            return
        if self.send_by <= now:
            self.cut.too_slow = True
            self.task.cancel()
        else:
            self.armed = True
            self.deadlines.add(self.send_by, self)


class Outlet:
    """A stream's way out for frames written outside its task: by the inline relay, from
    the pub/sub reader, while the stream's task waits for events (``gateway/inline_relay.py``).

    Ordering rule: a frame goes out here only when no earlier write is under way. A write that
    has to wait (the client reads slowly) is finished by a task of its own, under the stream's
    send timeout, and the stream's task waits for it (``drain``) before it writes again.
    """

    __slots__ = ("cut", "guard", "pending", "send", "send_timeout_s", "written_at")

    def __init__(self, cut: StreamCut, send_timeout_s: float) -> None:
        self.cut = cut
        self.send_timeout_s = send_timeout_s
        self.send: Send | None = None  # set while the response's body is being written
        self.guard: SendGuard | None = None
        self.pending: asyncio.Future[None] | None = None
        self.written_at = 0.0  # when a frame last went out here (monotonic)

    def ready(self) -> bool:
        return self.send is not None and self.pending is None

    def write(self, frame: bytes) -> None:
        """Write ``frame`` now, without waiting for it (only when ``ready``)."""
        assert self.send is not None and self.guard is not None
        self.written_at = time.monotonic()
        message = {"type": "http.response.body", "body": frame, "more_body": True}
        try:
            rest = start_now(self.send(message))
        except Exception:  # the response is broken: the stream ends as if its client left
            log.exception("inline_write_failed")
            self._cut()
            return
        if rest is not None:
            self.pending = rest
            self.guard.start(self.send_timeout_s)
            rest.add_done_callback(self._written)

    async def drain(self) -> None:
        """Wait for the write under way, if there is one."""
        if self.pending is not None:
            await self.pending

    def close(self) -> None:
        self.send = None
        if self.pending is not None:
            self.pending.cancel()

    def _written(self, task: asyncio.Future[None]) -> None:
        self.pending = None
        if self.guard is not None:
            self.guard.send_by = 0.0
        if not task.cancelled() and task.exception() is not None:
            self._cut()

    def _cut(self) -> None:
        self.cut.client_gone = True
        if self.guard is not None and self.guard.task is not None:
            self.guard.task.cancel()


class SSEResponse(Response):
    media_type = "text/event-stream"

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        *,
        headers: dict[str, str],
        outlet: Outlet,
        deadlines: Deadlines,
    ) -> None:
        super().__init__(
            status_code=200,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no", **headers},
            media_type="text/event-stream",
        )
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.frames = frames
        self.outlet = outlet
        self.cut = outlet.cut
        self.deadlines = deadlines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        await send(start)
        send = scope.get(DIRECT_SEND, send)  # the body: straight to the server (``direct_send``)
        task = asyncio.current_task()
        assert task is not None
        guard = SendGuard(self.deadlines, task, self.cut)
        watcher: asyncio.Future[None] | None = None
        try:
            # The first frame is in hand (the route waited for the first events), so it goes
            # out before the disconnect watcher starts: a stream that ends with its first write
            # (a short answer) never needs one, saving a task and two loop turns per request.
            if await self._send_next(send, guard):
                watcher = asyncio.ensure_future(self._watch(receive, task))
                # inline writes only from here: a stream written only inline must still
                # hear its client leave
                self.outlet.send, self.outlet.guard = send, guard
                while await self._send_next(send, guard):
                    pass
        except asyncio.CancelledError:
            if not (self.cut.client_gone or self.cut.too_slow):
                raise
            task.uncancel()
            if self.cut.too_slow:
                log.warning("sse_reader_too_slow", path=scope.get("path"))
        finally:
            self.outlet.close()
            guard.task = None  # an entry left in the wheel holds nothing of the stream
            if watcher is not None:
                watcher.cancel()
            await self.frames.aclose()  # type: ignore[attr-defined]

    async def _send_next(self, send: Send, guard: SendGuard) -> bool:
        """Write the next frame; False once the body has ended."""
        try:
            frame = await anext(self.frames)
        except StopAsyncIteration:
            await self.outlet.drain()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return False
        last = self.cut.last_frame
        await self.outlet.drain()  # a frame written inline goes out first
        guard.start(self.outlet.send_timeout_s)
        await send({"type": "http.response.body", "body": frame, "more_body": not last})
        guard.send_by = 0.0
        return not last

    async def _watch(self, receive: Receive, task: asyncio.Task[object]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not task.done():
            self.cut.client_gone = True
            task.cancel()
