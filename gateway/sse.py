"""``SSEResponse``: server-sent events written straight to ASGI, lean per stream.

One task streams the frames; a second only waits for the client's disconnect. Pings come
from the frame source itself (it yields a comment when quiet), and the send timeout is a
deadline in the gateway's shared ``Deadlines`` wheel, armed once and moved by each write (not
a cancel scope or a timer handle per write: at 10,000 streams those were a measurable part of
the relay's CPU). A stream that outlives its reader or its send timeout is
cancelled from the outside and ends quietly; its frame source's cleanup decides what happens to
the job (``StreamCut``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import structlog
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.multiplexer import Deadlines

log = structlog.get_logger("slipstream.gateway")


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


class SSEResponse(Response):
    media_type = "text/event-stream"

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        *,
        headers: dict[str, str],
        send_timeout_s: float,
        cut: StreamCut,
        deadlines: Deadlines,
    ) -> None:
        super().__init__(
            status_code=200,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no", **headers},
            media_type="text/event-stream",
        )
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.frames = frames
        self.send_timeout_s = send_timeout_s
        self.cut = cut
        self.deadlines = deadlines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        await send(start)
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
                while await self._send_next(send, guard):
                    pass
        except asyncio.CancelledError:
            if not (self.cut.client_gone or self.cut.too_slow):
                raise
            task.uncancel()
            if self.cut.too_slow:
                log.warning("sse_reader_too_slow", path=scope.get("path"))
        finally:
            guard.task = None  # an entry left in the wheel holds nothing of the stream
            if watcher is not None:
                watcher.cancel()
            await self.frames.aclose()  # type: ignore[attr-defined]

    async def _send_next(self, send: Send, guard: SendGuard) -> bool:
        """Write the next frame; False once the body has ended."""
        try:
            frame = await anext(self.frames)
        except StopAsyncIteration:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return False
        last = self.cut.last_frame
        guard.start(self.send_timeout_s)
        await send({"type": "http.response.body", "body": frame, "more_body": not last})
        guard.send_by = 0.0
        return not last

    async def _watch(self, receive: Receive, task: asyncio.Task[object]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not task.done():
            self.cut.client_gone = True
            task.cancel()
