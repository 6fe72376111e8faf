"""``entry(app)``: the ASGI callable uvicorn serves, the gateway's app with the OpenAI routes
called directly.

A completion request passed through Starlette's stack runs six layers before its route:
``ServerErrorMiddleware``, the request-context middleware, ``ExceptionMiddleware``, FastAPI's
exit-stack middleware, the router (matching each route in turn) and the route's own exception
wrapper. Each is cheap in a loop, but on the first token's path every step runs with cold
caches (docs/benchmarks.md, round 10), and together they were ~35 µs of the gateway's CPU per
request. So the routes in ``SHORTCUTS`` are matched here by method and exact path and their
endpoint is called at once, with what those layers would have done for it done here:

- each middleware's per-request work, through the ``begin(scope)`` it declares (a middleware
  that declares none may do anything, so the app is then served as it is);
- an exception the endpoint raises answered by the app's handler for its class (the nearest in
  its MRO, as Starlette looks them up; an app with a handler keyed by status code is served as
  it is). An exception raised while the response is written goes to the server, as it would
  through Starlette once the response has started.

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
from starlette.responses import Response
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
    it is, or the app has a handler keyed by status code (looked up only by Starlette)."""
    hooks = [getattr(m.cls, "begin", None) for m in app.user_middleware]
    if any(h is None for h in hooks) or any(isinstance(k, int) for k in app.exception_handlers):
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
        response = await _handled(app, request, exc)
    await response(scope, receive, send)


async def _handled(app: FastAPI, request: Request, exc: Exception) -> Response:
    """The app's answer to ``exc`` (re-raised when it has no handler for it)."""
    for cls in type(exc).__mro__:
        handler: Any = app.exception_handlers.get(cls)
        if handler is not None:
            answer = handler(request, exc)
            response: Response = await answer if inspect.isawaitable(answer) else answer
            return response
    raise exc
