"""``POST /v1/chat/completions`` and ``POST /v1/completions``: submit, then relay or collect.

These two are served as plain Starlette routes (``ROUTES``), not FastAPI ``APIRoute``s: an open
stream keeps its whole call stack alive, and FastAPI's per-request dependency layer (exit
stacks, dependency solving) would add about 6 KB to every open stream and a tenth of a
millisecond to every request. They take no parameters FastAPI would parse anyway (the body is
read by hand), so the only dependency, ``authenticate``, is called directly. ``documented``
describes them to the OpenAPI document; it is never mounted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from redis.exceptions import RedisError
from starlette.routing import Route

from gateway.auth import api_key_of, authenticate, authorize, tenant_of
from gateway.intake import build_job, parse, read_json
from gateway.openapi import json_body
from gateway.request_context import bind_job
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.state import GatewayState, gateway_state
from gateway.streaming import collect_response, new_dispatch, stream_response, writer_for
from shared.errors import Conflict, InvalidRequest, ModelNotFound, ShuttingDown
from shared.fleet import known_models
from shared.models import Job

Kind = Literal["chat", "completion"]


async def chat_completions(request: Request) -> Response:
    await authenticate(request)
    return await generate(request, "chat")


async def completions(request: Request) -> Response:
    await authenticate(request)
    return await generate(request, "completion")


ROUTES = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
]

documented = APIRouter()
documented.add_api_route(
    "/v1/chat/completions",
    chat_completions,
    methods=["POST"],
    openapi_extra=json_body(ChatCompletionRequest),
)
documented.add_api_route(
    "/v1/completions", completions, methods=["POST"], openapi_extra=json_body(CompletionRequest)
)


async def accept(request: Request, kind: Kind | None) -> tuple[GatewayState, Job, bool]:
    """Validate and admit a request; returns the job and whether the client wants a stream.

    ``kind=None`` (the job API) decides by the body: ``messages`` is chat, else completion.
    """
    state = gateway_state(request)
    if state.draining:
        raise ShuttingDown("the gateway is shutting down; retry on another replica")
    data = await read_json(request, state.settings.max_body_bytes)
    if kind is None:
        kind = "chat" if "messages" in data else "completion"
    body: ChatCompletionRequest | CompletionRequest = (
        parse(ChatCompletionRequest, data) if kind == "chat" else parse(CompletionRequest, data)
    )
    request.state.model = body.model  # labels an admission rejection's metric
    job = build_job(
        request,
        body,
        state.settings,
        tenant=tenant_of(request),
        now_ms=state.admission.clock.now_ms(),
    )
    options = body.stream_options
    job.include_usage = bool(options and (options.include_usage or options.continuous_usage_stats))
    job.continuous_usage = bool(options and options.continuous_usage_stats)
    authorize(request, job)  # 403 for a model the key may not use; priority ceiling
    await ensure_known_model(state, job.model)
    await state.admission.check(job)  # 400 context / 429 deadline or queue full
    request.state.rate_headers = await state.limits.charge(api_key_of(request), job)  # 429
    state.admission.admit(job)  # counted only once every gate passed
    return state, job, body.stream


async def generate(request: Request, kind: Kind) -> Response:
    state, job, stream = await accept(request, kind)
    existing, binding = await claim_idempotency_key(state, request, job)
    submit = existing is None
    if existing is not None:
        job = existing
    headers = {"X-Request-Id": job.request_id, "X-Slipstream-Job-Id": job.id}
    headers.update(request.state.rate_headers)
    cancel = cancel_on_disconnect(request) and submit
    dispatch = new_dispatch(state, job, submit=submit, cancel_on_exit=cancel)
    bind_job(job)
    observer = dispatch.observer = state.metrics.observe(job, stream=stream, timed=submit)
    writer = writer_for(job)
    try:
        if stream:
            return await stream_response(state, dispatch, writer, headers)
        return await collect_response(request, dispatch, writer, headers)
    except BaseException:
        observer.on_exit(dispatch, error=True)  # a no-op when the dispatch recorded its end
        if binding is not None:
            await binding.release_unless_enqueued(state, job)
        raise


def cancel_on_disconnect(request: Request) -> bool:
    """``X-Cancel-On-Disconnect: false`` keeps the job running for a later resume."""
    value = request.headers.get("x-cancel-on-disconnect", "true").strip().lower()
    if value not in ("true", "false"):
        raise InvalidRequest(
            "X-Cancel-On-Disconnect must be true or false", param="X-Cancel-On-Disconnect"
        )
    return value == "true"


class IdempotencyKeyMismatch(Conflict):
    """The key was used with a different request (Stripe's and the IETF draft's 422)."""

    status = 422
    code = "idempotency_key_mismatch"


# A binding whose job never reached Redis after this long is an enqueue that failed and could
# not free its key (Redis was unreachable): the next request with the key takes it over.
IDEMPOTENCY_PENDING_MS = 30_000

# Compare-and-set / compare-and-delete on one key (the key's binding is what we wrote).
_SWAP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
else redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
return 1
"""


def request_fingerprint(job: Job) -> str:
    """What a retry must repeat: the job as its request made it (not its ids or times)."""
    fields = job.model_dump(
        mode="json", exclude={"id", "request_id", "enqueued_at_ms", "deadline_at_ms"}
    )
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class IdempotencyBinding:
    """``Idempotency-Key`` bound to a job this request is submitting."""

    name: str
    value: str

    async def release_unless_enqueued(self, state: GatewayState, job: Job) -> None:
        """The submission failed: free the key unless the job reached Redis after all, so
        that the client's retry is submitted instead of getting 409 for the key's TTL."""
        with contextlib.suppress(RedisError, OSError):  # Redis down: the next claim takes over
            if await state.store.job_state(job.model, job.id) is None:
                await state.redis.eval(_SWAP, 1, self.name, self.value, "", "0")  # type: ignore[misc]


async def claim_idempotency_key(
    state: GatewayState, request: Request, job: Job
) -> tuple[Job | None, IdempotencyBinding | None]:
    """Bind ``Idempotency-Key`` to this job, or return the job it is already bound to.

    Returns ``(None, binding)`` when this request submits the job (the caller releases the
    binding if the submission fails), ``(existing job, None)`` for a retry of a submitted
    request. A key used with a different request is 422; a key whose request is still being
    submitted is 409 (retry).
    """
    key = request.headers.get("idempotency-key")
    if not key:
        return None, None
    if len(key) > 256:
        raise InvalidRequest(
            "Idempotency-Key is longer than 256 characters", param="Idempotency-Key"
        )
    name = state.keys.idempotency(job.tenant, key)
    ttl = state.settings.job_log_ttl_s
    fingerprint = request_fingerprint(job)
    now = state.admission.clock.now_ms()
    mine = json.dumps({"job": job.id, "fp": fingerprint, "at": now})
    for _ in range(3):  # bounded: the key may be freed or taken over between our reads
        if await state.redis.set(name, mine, nx=True, ex=ttl):
            return None, IdempotencyBinding(name, mine)
        raw = await state.redis.get(name)
        if raw is None:
            continue  # freed meanwhile (a failed submission): bind it now
        bound = _parse_binding(str(raw))
        if bound.get("fp") not in (None, fingerprint):
            raise IdempotencyKeyMismatch(
                "Idempotency-Key was already used with a different request body",
                param="Idempotency-Key",
            )
        job_id = str(bound["job"])
        existing = await state.store.load_job(job.model, job_id)
        if existing is not None and existing.tenant == job.tenant:
            return existing, None
        at = bound.get("at")
        if isinstance(at, int) and now - at > IDEMPOTENCY_PENDING_MS:
            swapped = await state.redis.eval(_SWAP, 1, name, str(raw), mine, str(ttl))  # type: ignore[misc]
            if swapped:
                return None, IdempotencyBinding(name, mine)
            continue
        break
    raise Conflict(
        "Idempotency-Key is in use by a request still being submitted; retry",
        param="Idempotency-Key",
    )


def _parse_binding(raw: str) -> dict[str, object]:
    """``{"job", "fp", "at"}``; a bare job id (bound before fingerprints) matches any body."""
    if raw.startswith("{"):
        with contextlib.suppress(ValueError):
            value = json.loads(raw)
            if isinstance(value, dict) and "job" in value:
                return value
    return {"job": raw}


async def ensure_known_model(state: GatewayState, model: str) -> None:
    if model in state.settings.models or model in await known_models(state.redis, state.keys):
        return
    raise ModelNotFound(f"the model {model!r} does not exist", param="model")
