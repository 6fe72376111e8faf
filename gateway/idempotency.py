"""``Idempotency-Key``: a repeated submit attaches to the job it already made.

The key is bound (``SET NX``) to the job id, a fingerprint of the request (without its ids and
times) and when it was bound, before the job is enqueued; a failed enqueue frees it again, so
the client's retry is submitted rather than refused. A retry of the same request gets the
existing job; the same key with a different request is 422 (Stripe's and the IETF draft's
semantics); a key whose request is still being submitted is 409 (retry). A binding that a
failed request could not free (Redis was down) is taken over after ``IDEMPOTENCY_PENDING_MS``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass

from redis.exceptions import RedisError
from starlette.requests import Request

from gateway.state import GatewayState
from shared.errors import Conflict, InvalidRequest
from shared.models import Job


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
