"""Who is calling: API key authentication (a router dependency) and what the key allows.

Auth is off until ``SLIPSTREAM_AUTH_REQUIRED=true`` (like vLLM's ``--api-key``): every caller
is then the tenant ``anonymous`` with no limits, so ``slipstream up`` stays one command. With it
on, every ``/v1`` request needs ``Authorization: Bearer sk-slip-...`` (or ``api-key:``); a
missing, unknown or revoked key is a 401 before the body is read, so nothing is enqueued.

What a key allows is checked once the job is built (``authorize``): a model outside the key's
list is a 403 (``model_not_allowed``); a priority above the key's ceiling is lowered to the
ceiling, not refused, so one client setting ``X-Priority: high`` for everyone still works.
A key without the ``inference`` scope (a Prometheus token) is a 403 on ``/v1``.

Operator endpoints (``/metrics``, ``/dashboard`` and its data) are guarded by
``require_operator``: with auth on they need a key with the ``metrics`` or ``admin`` scope.
Prometheus sends it as a bearer token (``authorization`` in its scrape config); a browser sends
it as the password of HTTP Basic auth (the 401 carries a Basic challenge, so the browser asks
once and then sends it with every request of the page, the dashboard's polls included). One
credential store, one revocation path, no second listener to firewall.
"""

from __future__ import annotations

import base64
import binascii

from fastapi import Request

from gateway.apikeys import ApiKey, Scope, lookup
from gateway.state import gateway_state
from shared.errors import Forbidden, Unauthorized
from shared.models import Job

ANONYMOUS = "anonymous"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="slipstream"'}
OPERATOR_CHALLENGE = {"WWW-Authenticate": 'Basic realm="slipstream operator", charset="UTF-8"'}
OPERATOR_SCOPES = (Scope.METRICS, Scope.ADMIN)


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None
    return request.headers.get("api-key") or request.headers.get("x-api-key")


def basic_password(request: Request) -> str | None:
    """The key sent as HTTP Basic credentials: the password, or the user when it is empty
    (``curl -u sk-slip-...:``); None when the header is not Basic or does not decode."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return password or user or None


async def authenticate(request: Request) -> None:
    """Router dependency: record the caller's tenant and key on ``request.state``."""
    state = gateway_state(request)
    request.state.api_key = None
    request.state.tenant = ANONYMOUS
    if not state.settings.auth_required:
        return
    secret = presented_key(request)
    if secret is None:
        raise Unauthorized(
            "missing API key: send 'Authorization: Bearer sk-slip-...'", headers=CHALLENGE
        )
    key = await lookup(state.redis, state.keys, secret)
    if key is None or key.revoked:
        raise Unauthorized("invalid or revoked API key", headers=CHALLENGE)
    if not key.allows(Scope.INFERENCE):
        raise Forbidden(
            "this API key has no 'inference' scope (it is for operator endpoints)",
            code="insufficient_scope",
        )
    request.state.api_key = key
    request.state.tenant = key.tenant


async def require_operator(request: Request) -> None:
    """Router dependency of the operator endpoints: with auth on, a key with the ``metrics`` or
    ``admin`` scope (bearer or Basic), else 401 (no or unknown key) or 403 (a tenant's key).

    With auth off every endpoint is open, as the ``/v1`` API is: bind the gateway to a trusted
    network then.
    """
    state = gateway_state(request)
    if not state.settings.auth_required:
        return
    secret = basic_password(request) or presented_key(request)
    if secret is None:
        raise Unauthorized(
            "operator endpoint: send an API key with the 'metrics' or 'admin' scope "
            "('Authorization: Bearer sk-slip-...', or as the Basic auth password)",
            headers=OPERATOR_CHALLENGE,
        )
    key = await lookup(state.redis, state.keys, secret)
    if key is None or key.revoked:
        raise Unauthorized("invalid or revoked API key", headers=OPERATOR_CHALLENGE)
    if not any(key.allows(scope) for scope in OPERATOR_SCOPES):
        raise Forbidden(
            "this API key has neither the 'metrics' nor the 'admin' scope",
            code="insufficient_scope",
        )


def tenant_of(request: Request) -> str:
    """The authenticated tenant, or ``anonymous`` when auth is off."""
    tenant = getattr(request.state, "tenant", None)
    return tenant if isinstance(tenant, str) else ANONYMOUS


def api_key_of(request: Request) -> ApiKey | None:
    key = getattr(request.state, "api_key", None)
    return key if isinstance(key, ApiKey) else None


def allows_model(request: Request, model: str) -> bool:
    key = api_key_of(request)
    return key is None or not key.models or model in key.models


def authorize(request: Request, job: Job) -> None:
    """403 for a model the key may not use; a priority above its ceiling is lowered to it."""
    key = api_key_of(request)
    if key is None:
        return
    if not allows_model(request, job.model):
        raise Forbidden(
            f"this API key may not use the model {job.model!r}",
            param="model",
            code="model_not_allowed",
        )
    if job.priority.rank < key.max_priority.rank:
        job.priority = key.max_priority
