"""``entry``: the OpenAI routes called directly give the answers the app's stack gives, and an
app whose middleware does not say what it does per request is served through its stack."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import structlog
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.app import create_app
from gateway.entry import SHORTCUTS, entry
from shared.errors import InvalidRequest
from tests.helpers import free_port, gateway_settings, running_app

CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def _crash(request: Request) -> Response:
    raise RuntimeError("a bug")


async def _refuse(request: Request) -> Response:
    raise InvalidRequest("refused here", param="x")


async def _context(request: Request) -> Response:
    bound = structlog.contextvars.get_contextvars()
    routed = "router" in request.scope  # set by Starlette's router, which a shortcut skips
    return Response(f"{bound.get('request_id')} routed={routed}", media_type="text/plain")


TEST_ROUTES = [
    Route("/test/crash", _crash, methods=["POST"]),
    Route("/test/refuse", _refuse, methods=["POST"]),
    Route("/test/context", _context, methods=["POST"]),
]
ASKS: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/v1/chat/completions", {"content": b"{not json"}),
    ("POST", "/v1/chat/completions", {"json": {**CHAT, "model": "no-such-model"}}),
    ("POST", "/v1/chat/completions", {"json": {**CHAT, "max_tokens": -1}}),
    ("POST", "/v1/completions", {"json": {"model": "sim-model"}}),
    ("GET", "/v1/chat/completions", {}),
    ("POST", "/test/crash", {}),
    ("POST", "/test/refuse", {}),
    ("POST", "/test/context", {"headers": {"X-Request-Id": "req-entry-1"}}),
]


async def _answers(
    app: ASGIApp, asks: list[tuple[str, str, dict[str, Any]]] = ASKS
) -> list[tuple[int, str]]:
    out = []
    async with running_app(app, free_port()) as base, httpx.AsyncClient(base_url=base) as c:
        for method, path, kwargs in asks:
            r = await c.request(method, path, **kwargs)
            out.append((r.status_code, r.text))
    return out


@pytest.fixture
def routed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths Starlette's router was called for."""
    paths: list[str] = []
    inner = Router.__call__

    async def spy(self: Router, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            paths.append(scope["path"])
        await inner(self, scope, receive, send)

    monkeypatch.setattr(Router, "__call__", spy)
    return paths


async def test_the_routes_called_directly_answer_as_through_the_app(
    redis_url: str, routed: list[str]
) -> None:
    settings = gateway_settings(redis_url, models=["sim-model"])
    through = create_app(settings)
    through.router.routes[:0] = TEST_ROUTES
    direct = create_app(settings)
    direct.router.routes[:0] = TEST_ROUTES
    served = entry(direct, [*SHORTCUTS, *TEST_ROUTES])
    answers = await _answers(served)
    assert routed == ["/v1/chat/completions"]  # only the GET, which no shortcut matches
    expected = await _answers(through)
    assert len(routed) == 1 + len(ASKS)
    assert answers[:-1] == expected[:-1]
    statuses = [status for status, _ in answers]
    assert statuses == [400, 404, 400, 400, 405, 500, 400, 200]
    # the middleware's per-request work was done; only the shortcut skipped the router
    assert answers[-1][1] == "req-entry-1 routed=False"
    assert expected[-1][1] == "req-entry-1 routed=True"
    assert '"internal_error"' in answers[5][1]


class _Watching:
    """A middleware that leaves bodies alone but does not say what it does per request."""

    leaves_bodies = True

    def __init__(self, app: ASGIApp, seen: list[str]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen.append(scope["path"])
        await self.app(scope, receive, send)


async def test_a_middleware_without_begin_sees_every_request(redis_url: str) -> None:
    seen: list[str] = []
    app = create_app(gateway_settings(redis_url, models=["sim-model"]))
    app.add_middleware(_Watching, seen=seen)
    served = entry(app)
    async with running_app(served, free_port()) as base, httpx.AsyncClient(base_url=base) as c:
        r = await c.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400
    assert seen == ["/v1/chat/completions"]


async def _refused(app: FastAPI, served: ASGIApp, drain: bool) -> tuple[int, str]:
    async with running_app(served, free_port()) as base, httpx.AsyncClient(base_url=base) as c:
        app.state.gateway.draining = drain
        r = await c.post("/v1/chat/completions", json=CHAT)
    return r.status_code, r.text


@pytest.mark.parametrize(("auth", "drain", "status"), [(True, False, 401), (False, True, 503)])
async def test_refusals_before_the_body_answer_as_through_the_app(
    redis_url: str, auth: bool, drain: bool, status: int
) -> None:
    """No API key (401), a draining gateway (503): the real routes, both ways."""
    settings = gateway_settings(redis_url, models=["sim-model"], auth_required=auth)
    through, direct = create_app(settings), create_app(settings)
    answer = await _refused(direct, entry(direct), drain)
    assert answer == await _refused(through, through, drain)
    assert answer[0] == status
