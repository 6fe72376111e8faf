"""``entry(app)``: the ASGI callable uvicorn serves, the gateway's app with the OpenAI routes
called directly.

A completion request passed through FastAPI's stack runs eight layers before its route:
``ServerErrorMiddleware``, FastAPI's telemetry and body-limit middleware (both idle here), the
request-context middleware, ``ExceptionMiddleware``, FastAPI's exit-stack middleware, the
router (matching each route in turn) and the route's own exception wrapper. Each is cheap in
a loop, but on the first token's path every step runs with cold caches (docs/benchmarks.md,
round 10), and together they were ~35 µs of the gateway's CPU per request; an open stream
also held their frames for its whole life (~7 KB). So the routes in ``SHORTCUTS`` are
matched here by method and exact path and their endpoint is called at once, with what those
layers would have done for it done here:

- each middleware's per-request work, through the ``begin(scope)`` it declares (a middleware
  that declares none may do anything, so the app is then served as it is; so is an app with
  a body-size limit of FastAPI's, or a handler keyed by status code);
- an exception the endpoint raises answered by the app's handler for the nearest class in
  its MRO, as ``ExceptionMiddleware`` does. One that only the catch-all (``Exception``)
  handler takes is answered by it and then re-raised to the server, as
  ``ServerErrorMiddleware`` does; so is one raised while the response is written (the
  handler logs it; its answer cannot go out).

Every other request takes the app's stack, with its SSE bodies sent straight to the server
(``gateway.sse.direct_send``). ``tests/test_entry.py`` holds the two paths to the same answers.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.routes import completions
from gateway.sse import DIRECT_SEND, direct_send

log = structlog.get_logger("slipstream.gateway")

Endpoint = Callable[[Request], Awaitable[Response]]
Begin = Callable[[Scope], None]
SHORTCUTS: Sequence[Route] = completions.ROUTES


def entry(app: FastAPI, shortcuts: Sequence[Route] = SHORTCUTS) -> ASGIApp:
    """``app`` as uvicorn serves it (ASGI 3, ``interface="asgi3"``): ``shortcuts`` called
    directly where that is the same as through the app (module docstring), SSE bodies sent
    straight to the server where that is (``direct_send``)."""
    inner = direct_send(app)
    begins = _begins(app)
    if inner is app or begins is None:
        return inner
    table: dict[str, tuple[set[str], Endpoint]] = {
        r.path: (r.methods or set(), r.endpoint) for r in shortcuts
    }

    def served(scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] == "http" and (found := table.get(scope["path"])) is not None:
            methods, endpoint = found
            if scope["method"] in methods:
                scope[DIRECT_SEND] = send
                return _call(app, begins, endpoint, scope, receive, send)
        return inner(scope, receive, send)

    return served


def _begins(app: FastAPI) -> list[Begin] | None:
    """Each middleware's per-request work, outermost first; None when one does not say what
    it is, the app limits body sizes itself, or it has a handler keyed by status code (looked
    up only by Starlette)."""
    hooks = [getattr(m.cls, "begin", None) for m in app.user_middleware]
    limited = getattr(app, "max_body_size", None) is not None  # FastAPI's own body limit
    if (
        limited
        or any(h is None for h in hooks)
        or any(isinstance(k, int) for k in app.exception_handlers)
    ):
        named = [getattr(m.cls, "__name__", repr(m.cls)) for m in app.user_middleware]
        log.warning("route_shortcuts_off", middleware=named)
        return None
    return [h for h in hooks if h is not None]


async def _call(
    app: FastAPI,
    begins: list[Begin],
    endpoint: Endpoint,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    scope["app"] = app  # what ``Starlette.__call__`` sets: ``request.app``
    for begin in begins:
        begin(scope)
    request = Request(scope, receive, send)
    try:
        response = await endpoint(request)
    except Exception as exc:
        handler = _handler(app, exc)
        if handler is None:  # as Starlette's outermost middleware: the catch-all's answer,
            await (await _caught(app, request, exc))(scope, receive, send)
            raise  # then the server's own handling (its log line)
        response = await _answer(handler, request, exc)
    try:
        await response(scope, receive, send)
    except Exception as exc:  # the response has started: the catch-all only sees it
        await _caught(app, request, exc)
        raise


def _handler(app: FastAPI, exc: Exception) -> Any:
    """The app's handler for the nearest class in ``exc``'s MRO, the catch-all excepted."""
    for cls in type(exc).__mro__:
        if cls is not Exception and (handler := app.exception_handlers.get(cls)) is not None:
            return handler
    return None


async def _caught(app: FastAPI, request: Request, exc: Exception) -> Response:
    """The catch-all handler's answer (it logs), or Starlette's plain 500 without one."""
    handler = app.exception_handlers.get(Exception)
    if handler is None:
        return PlainTextResponse("Internal Server Error", status_code=500)
    return await _answer(handler, request, exc)


async def _answer(handler: Any, request: Request, exc: Exception) -> Response:
    answer = handler(request, exc)
    response: Response = await answer if inspect.isawaitable(answer) else answer
    return response
