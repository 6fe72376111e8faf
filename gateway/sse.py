"""``SSEResponse``: server-sent events written straight to ASGI, lean per stream.

One task streams the frames; a second only waits for the client's disconnect. Pings come
from the frame source itself (it yields a comment when quiet), and the send timeout is a timer
handle, not a cancel scope per write. A stream that outlives its reader or its send timeout is
cancelled from the outside and ends quietly; its frame source's cleanup decides what happens to
the job (``StreamCut``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import structlog
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

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


class SSEResponse(Response):
    media_type = "text/event-stream"

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        *,
        headers: dict[str, str],
        send_timeout_s: float,
        cut: StreamCut,
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        await send(start)
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.ensure_future(self._watch(receive, task))
        try:
            await self._stream(send, task)
        except asyncio.CancelledError:
            if not (self.cut.client_gone or self.cut.too_slow):
                raise
            task.uncancel()
            if self.cut.too_slow:
                log.warning("sse_reader_too_slow", path=scope.get("path"))
        finally:
            watcher.cancel()
            await self.frames.aclose()  # type: ignore[attr-defined]

    async def _stream(self, send: Send, task: asyncio.Task[object]) -> None:
        loop = asyncio.get_running_loop()
        async for frame in self.frames:
            last = self.cut.last_frame
            timer = loop.call_later(self.send_timeout_s, self._too_slow, task)
            try:
                await send({"type": "http.response.body", "body": frame, "more_body": not last})
            finally:
                timer.cancel()
            if last:
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _too_slow(self, task: asyncio.Task[object]) -> None:
        self.cut.too_slow = True
        task.cancel()

    async def _watch(self, receive: Receive, task: asyncio.Task[object]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not task.done():
            self.cut.client_gone = True
            task.cancel()
