"""``AffinityPolicy``: how long a job may wait for the worker that holds its prefix warm.

The gateway fingerprints each job (``shared.prefix``) and hands the fingerprint, the job's
session and its wait to ``ENQUEUE``; ``PULL`` decides, when the job reaches the head of its
queue, whether a live worker with room holds more of it warm than the worker pulling (or
served the session's last turn) and reserves it for that worker for at most the wait. The
policy lives with the gateway: workers need no setting to follow it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from shared.models import Job
from shared.prefix import block_hashes
from shared.prompt import render_transcript


@dataclass(frozen=True, slots=True)
class AffinityPolicy:
    """``wait_ms``: longest reservation for a warm worker (0: affinity off); a job never waits
    more than a quarter of the time left to its deadline. ``session_ttl_ms``: how long a
    session remembers the worker of its last turn."""

    wait_ms: int = 250
    session_ttl_ms: int = 900_000

    def enqueue_arg(self, job: Job) -> str:
        """The JSON ``ENQUEUE`` stores with the job (``{}`` when affinity is off)."""
        if self.wait_ms <= 0:
            return "{}"
        return json.dumps(
            {
                "fp": " ".join(block_hashes(render_transcript(job))),
                "session": job.session or "",
                "aw": self.wait_ms,
                "sttl": self.session_ttl_ms,
                "dl": job.deadline_at_ms or 0,
            },
            separators=(",", ":"),
        )


def session_key(tenant: str, session: str) -> str:
    """A session id as stored (hashed, per tenant: two tenants never share a session)."""
    return hashlib.sha256(f"{tenant}\0{session}".encode()).hexdigest()[:24]
