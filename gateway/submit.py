"""From an HTTP request to an admitted job, for every route that submits one: the two OpenAI
endpoints and ``POST /v1/jobs``.

The gates run in one order for all of them (docs/admission.md): drain check, body, schema,
the key's model and priority rights, a known model, admission (context, deadline, queue
limits), the key's rate limits, and only then the job counts as admitted. A request refused at
any gate leaves no trace in Redis but its refusal (counted here, by model and reason, for an
admission or rate-limit 429). Nothing here enqueues: the route submits what ``accept``
returns, through a ``Dispatch`` (streamed or collected) or at once (``enqueue_now``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request

from gateway.auth import api_key_of, authorize, tenant_of
from gateway.idempotency import claim_idempotency_key
from gateway.intake import build_job, parse, read_json
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.state import GatewayState, gateway_state
from shared.errors import ModelNotFound, Overloaded, ShuttingDown
from shared.fleet import known_models
from shared.models import Job

Kind = Literal["chat", "completion"]


@dataclass(frozen=True, slots=True)
class Accepted:
    """A request that passed every gate."""

    state: GatewayState
    job: Job
    stream: bool  # the client asked for server-sent events
    rate_headers: dict[str, str]  # the key's ``x-ratelimit-*`` figures after this charge

    def headers(self, job: Job) -> dict[str, str]:
        """Response headers naming ``job`` (the one submitted, or the idempotent original)."""
        return {"X-Request-Id": job.request_id, "X-Slipstream-Job-Id": job.id, **self.rate_headers}


async def accept(request: Request, kind: Kind | None, *, follow: bool = False) -> Accepted:
    """Validate and admit a request. ``kind=None`` (the job API) decides by the body:
    ``messages`` is chat, else completion. ``follow``: the caller will listen to the job's
    events (the OpenAI routes), so once every gate has let it in, the job takes an id whose
    channel is subscribed already (``gateway/spare_channels.py``)."""
    state = gateway_state(request)
    if state.draining:
        raise ShuttingDown("the gateway is shutting down; retry on another replica")
    data = await read_json(request, state.settings.max_body_bytes)
    if kind is None:
        kind = "chat" if "messages" in data else "completion"
    body: ChatCompletionRequest | CompletionRequest = (
        parse(ChatCompletionRequest, data) if kind == "chat" else parse(CompletionRequest, data)
    )
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
    try:
        await state.admission.check(job)  # 400 context / 429 deadline or queue full
        rate_headers = await state.limits.charge(api_key_of(request), job)  # 429
    except Overloaded as exc:
        state.metrics.rejected(job.model, exc.code)
        raise
    # only the charge used the id ``build_job`` gave the job, to name itself
    if follow and (spare := state.mux.spare_id(job.model)) is not None:
        job.id = spare
    state.admission.admit(job)  # counted only once every gate passed
    return Accepted(state, job, body.stream, rate_headers)


async def ensure_known_model(state: GatewayState, model: str) -> None:
    """A model named in the settings, served by a live worker (the admission's view: no round
    trip on the first token's path) or served by any worker ever (``SMEMBERS``)."""
    if model in state.settings.models or state.admission.serves(model):
        return
    if model in await known_models(state.redis, state.keys):
        return
    raise ModelNotFound(f"the model {model!r} does not exist", param="model")


async def enqueue_now(request: Request, accepted: Accepted) -> tuple[Job, bool]:
    """Queue an accepted job at once (the job API); with an ``Idempotency-Key`` already bound,
    the original job instead. Returns the job and whether it already existed. A failed enqueue
    frees the key, so the client's retry is not refused as a duplicate."""
    state, job = accepted.state, accepted.job
    existing, binding = await claim_idempotency_key(state, request, job)
    if existing is not None:
        return existing, True
    try:
        await state.store.enqueue(job)
    except BaseException:
        if binding is not None:
            await binding.release_unless_enqueued(state, job)
        raise
    return job, False
