"""``direct_send``: an SSE response's start goes through the middleware, its body frames
straight to the server; served without ``direct_send``, everything takes the middleware's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from gateway.multiplexer import Deadlines
from gateway.sse import DIRECT_SEND, Outlet, SSEResponse, StreamCut, direct_send
from tests.helpers import free_port, running_app


def _stream(cut: StreamCut, inline_sends: list[object] | None = None) -> SSEResponse:
    outlet = Outlet(cut, 5.0)

    async def frames() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        if inline_sends is not None:  # what the inline relay would write with, meanwhile
            inline_sends.append(outlet.send)
        cut.last_frame = True
        yield b"data: 2\n\n"

    return SSEResponse(frames(), headers={}, outlet=outlet, deadlines=Deadlines())


async def test_the_start_goes_through_the_middleware_and_the_body_straight_out() -> None:
    wrapped: list[dict[str, Any]] = []
    direct: list[dict[str, Any]] = []

    async def through_middleware(message: Any) -> None:
        wrapped.append(message)

    async def server(message: Any) -> None:
        direct.append(message)

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)  # the client never leaves
        return {"type": "http.disconnect"}

    scope = {"type": "http", "path": "/", DIRECT_SEND: server}
    inline_sends: list[object] = []
    stream = _stream(StreamCut(), inline_sends)
    await asyncio.wait_for(stream(scope, receive, through_middleware), 5)
    assert inline_sends == [server]  # the inline relay's writes go straight out too
    assert [m["type"] for m in wrapped] == ["http.response.start"]
    assert [(m["body"], m["more_body"]) for m in direct] == [
        (b"data: 1\n\n", True),
        (b"data: 2\n\n", False),
    ]


class _Passing:
    leaves_bodies = True

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


async def _read(served: Any) -> str:
    async with running_app(served, free_port()) as base, httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"{base}/events")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    return response.text


def _app() -> FastAPI:
    app = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False})  # as the gateway

    @app.get("/events")
    async def events() -> SSEResponse:
        return _stream(StreamCut())

    return app


async def test_served_directly_the_client_reads_what_it_reads_through_the_middleware() -> None:
    app = _app()
    app.add_middleware(_Passing)
    served = direct_send(app)
    assert served is not app
    assert await _read(served) == await _read(app) == "data: 1\n\ndata: 2\n\n"


async def test_an_app_with_a_middleware_that_may_touch_bodies_is_served_as_it_is() -> None:
    seen: list[str] = []
    app = _app()

    @app.middleware("http")  # BaseHTTPMiddleware: re-streams every response body
    async def watch(request: Any, call_next: Any) -> Any:
        seen.append(request.url.path)
        return await call_next(request)

    served = direct_send(app)
    assert served is app
    assert await _read(served) == "data: 1\n\ndata: 2\n\n"
    assert seen == ["/events"]


def test_fastapi_telemetry_watching_the_body_keeps_the_app_as_it_is() -> None:
    app = FastAPI(telemetry={"tracing": True, "metrics": False, "logs": False})
    assert direct_send(app) is app
    quiet = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False})
    assert direct_send(quiet) is not quiet


def test_a_middleware_added_after_it_is_refused_not_missed() -> None:
    app = _app()
    direct_send(app)
    with pytest.raises(RuntimeError):
        app.add_middleware(_Passing)


async def test_a_stream_that_fails_midway_ends_the_response_and_the_server_serves_on() -> None:
    """Frames go direct, the failure still goes through the middleware: the client gets the
    frames before it and a cut body (no 500 once the response started); the next request on
    the same server is served."""
    app = _app()

    @app.get("/broken")
    async def broken() -> SSEResponse:
        cut = StreamCut()

        async def frames() -> AsyncIterator[bytes]:
            yield b"data: 1\n\n"
            raise RuntimeError("the frame source broke")

        return SSEResponse(frames(), headers={}, outlet=Outlet(cut, 5.0), deadlines=Deadlines())

    served = direct_send(app)
    assert served is not app
    async with running_app(served, free_port()) as base, httpx.AsyncClient(timeout=5) as client:
        seen = b""
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("GET", f"{base}/broken") as response:
                assert response.status_code == 200
                async for chunk in response.aiter_bytes():
                    seen += chunk
        assert seen == b"data: 1\n\n"
        again = await client.get(f"{base}/events")
        assert again.status_code == 200 and again.text == "data: 1\n\ndata: 2\n\n"
