"""The exception hierarchy, written down once, and the OpenAI error envelope it renders to.

Every error a client can see is a ``SlipstreamError`` with an HTTP status, an OpenAI error
``type`` and a machine-readable ``code``; the gateway turns it into
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any


class SlipstreamError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def envelope(self) -> dict[str, Any]:
        return error_envelope(self.message, self.type, self.code, self.param)


def error_envelope(message: str, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class InvalidRequest(SlipstreamError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(SlipstreamError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(SlipstreamError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(SlipstreamError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(SlipstreamError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(SlipstreamError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class Overloaded(SlipstreamError):
    """Admission refused the request; ``Retry-After`` says when to come back."""

    status = 429
    type = "rate_limit_error"
    code = "overloaded"


class RateLimited(Overloaded):
    code = "rate_limit_exceeded"


class NoWorker(SlipstreamError):
    status = 503
    type = "server_error"
    code = "no_worker_available"


class ShuttingDown(SlipstreamError):
    status = 503
    type = "server_error"
    code = "shutting_down"


class DeadlineExceeded(SlipstreamError):
    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


class UpstreamError(SlipstreamError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class LeaseLost(Exception):
    """A worker's write was fenced off: another worker owns the job now, or it was cancelled."""


def error_type_for(status: int) -> str:
    """The OpenAI error ``type`` that goes with an HTTP status."""
    if status == 429:
        return "rate_limit_error"
    if status == 504:
        return "timeout_error"
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


class JobFailed(SlipstreamError):
    """A job ended with an error event; status and code come from the event."""

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.type = error_type_for(status)
