"""Per-request log context: every gateway log line of a request carries its ``request_id``.

The middleware starts each request with a clean structlog context and binds the client's
``X-Request-Id`` when it is valid; ``bind_job`` then binds the id the job really carries (the
client's, or the one the gateway made up) and the job id. Workers bind the same
``job.request_id`` when they run the job, so one id follows a request through every process.
"""

from __future__ import annotations

import structlog
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.intake import REQUEST_ID
from shared.models import Job


class RequestContextMiddleware:
    leaves_bodies = True  # responses pass through untouched (``gateway.sse.direct_send``)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.begin(scope)
        await self.app(scope, receive, send)

    @staticmethod
    def begin(scope: Scope) -> None:
        """Its whole work for an HTTP request (``gateway/entry.py`` calls it for the routes it
        serves without the middleware stack)."""
        structlog.contextvars.clear_contextvars()
        given = Headers(scope=scope).get("x-request-id")
        if given and REQUEST_ID.match(given):
            structlog.contextvars.bind_contextvars(request_id=given)


def bind_job(job: Job) -> None:
    structlog.contextvars.bind_contextvars(request_id=job.request_id, job_id=job.id)
