"""Every Redis key and channel name Slipstream uses, in one place.

Keys that belong to one model carry the hash tag ``{model}`` so that a model's streams, jobs
and event logs share one Redis Cluster slot (the Lua scripts touch several of them at once).
Names stay readable so ``redis-cli XLEN slip:{gemma-3-270m}:queue:high`` answers "how deep".
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from shared.models import Priority

CONSUMER_GROUP = "workers"

# Per-model key names, after the model prefix ``<prefix>:{model}:``. A Lua script gets the
# keys it knows before the call through KEYS (``Keys`` below names them); the keys it finds
# only at run time (a job id read from a queue, a worker id from ``members``, a priority from
# a job's hash) it builds from these same names, handed to it as the table ``K``
# (``LUA_NAMES``; shared/scripts.py writes it), so this module stays the one place that names
# keys. Every name stays inside the model's ``{model}`` hash tag (one Cluster slot).
QUEUE = "queue:"  # + priority
SHARE = "share:"  # + priority
DEFERRED = "deferred:"  # + priority + PART + tenant part
PART = ":"  # between two parts of a name
JOB = "job:"  # + job id
JOB_LOG = ":log"  # a job's key +
JOB_EVENTS = ":events"  # a job's key + (a pub/sub channel)
WORKER = "worker:"  # + worker id
WARM = "warm:"  # + worker id
INBOX = "inbox:"  # + worker id
SESSION = "session:"  # + session hash

# the Lua name of each (``K.job`` is ``JOB``)
LUA_NAMES: tuple[tuple[str, str], ...] = (
    ("queue", QUEUE),
    ("share", SHARE),
    ("deferred", DEFERRED),
    ("part", PART),
    ("job", JOB),
    ("job_log", JOB_LOG),
    ("job_events", JOB_EVENTS),
    ("worker", WORKER),
    ("warm", WARM),
    ("inbox", INBOX),
    ("session", SESSION),
)


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix (``SLIPSTREAM_PREFIX``, default ``slip``)."""

    prefix: str = "slip"

    # --- per model -----------------------------------------------------------------------
    def model_prefix(self, model: str) -> str:
        """``slip:{model}:``: every per-model key starts with it (the Lua scripts build the keys
        they find at run time from it and ``LUA_NAMES``)."""
        return f"{self.prefix}:{{{model}}}:"

    def queue(self, model: str, priority: Priority) -> str:
        """Stream of job ids waiting for a worker (one per model and priority)."""
        return f"{self.prefix}:{{{model}}}:{QUEUE}{priority.value}"

    @staticmethod
    def tenant_part(tenant: str) -> str:
        """A tenant name as it appears in key names (hashed unless plainly safe)."""
        if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", tenant):
            return tenant
        return "h-" + hashlib.sha256(tenant.encode()).hexdigest()[:16]

    def deferred(self, model: str, priority: Priority, tenant: str) -> str:
        """Stream: a tenant's jobs beyond its fair share of the shared queue, in order."""
        part = self.tenant_part(tenant)
        return f"{self.prefix}:{{{model}}}:{DEFERRED}{priority.value}{PART}{part}"

    def share(self, model: str, priority: Priority) -> str:
        """Hash: tenant part -> tokens its jobs hold in the shared queue of a priority."""
        return f"{self.prefix}:{{{model}}}:{SHARE}{priority.value}"

    def fair(self, model: str) -> str:
        """Hash: the model's fairness settings (``quantum``: a tenant's share of a queue)."""
        return f"{self.prefix}:{{{model}}}:fair"

    def leases(self, model: str) -> str:
        """Sorted set: running job id scored by its lease end (ms); expired = take over."""
        return f"{self.prefix}:{{{model}}}:leases"

    def wake(self, model: str) -> str:
        """Stream idle workers also block on: a draining worker's hand-back wakes them."""
        return f"{self.prefix}:{{{model}}}:wake"

    def queues(self, model: str) -> list[str]:
        """The model's queues, highest priority first."""
        return [self.queue(model, p) for p in Priority.ordered()]

    def backlog(self, model: str) -> str:
        """Hash: ``<priority>:tokens`` and ``<priority>:jobs`` of jobs still queued (admission)."""
        return f"{self.prefix}:{{{model}}}:backlog"

    def dead_letter(self, model: str) -> str:
        """Stream of jobs that failed too many deliveries (poison jobs)."""
        return f"{self.prefix}:{{{model}}}:dead"

    def job(self, model: str, job_id: str) -> str:
        """Hash: state, payload, lease owner and fence, sequence, usage."""
        return f"{self.prefix}:{{{model}}}:{JOB}{job_id}"

    def job_log(self, model: str, job_id: str) -> str:
        """Stream: the job's event log, the source of truth for its output."""
        return f"{self.prefix}:{{{model}}}:{JOB}{job_id}{JOB_LOG}"

    def job_channel(self, model: str, job_id: str) -> str:
        """Pub/sub channel: the fast path for the job's events."""
        return f"{self.prefix}:{{{model}}}:{JOB}{job_id}{JOB_EVENTS}"

    def control_channel(self, model: str) -> str:
        """Pub/sub channel workers of a model listen on (cancellations)."""
        return f"{self.prefix}:{{{model}}}:control"

    # --- warm state (affinity): per worker of a model, expiring with the worker -------------
    def worker_state(self, model: str, worker: str) -> str:
        """Hash: a live worker's ``free`` tokens and ``seqs`` (free sequence slots) as of its
        last pull or heartbeat, and ``rtok``/``rjobs`` reserved for it; expires with it."""
        return f"{self.prefix}:{{{model}}}:{WORKER}{worker}"

    def warm(self, model: str, worker: str) -> str:
        """Set: the prefix block hashes (``shared.prefix``) a worker's engine holds warm."""
        return f"{self.prefix}:{{{model}}}:{WARM}{worker}"

    def members(self, model: str) -> str:
        """Set: ids of the model's workers that may hold warm state (pruned when dead)."""
        return f"{self.prefix}:{{{model}}}:members"

    def inbox(self, model: str, worker: str) -> str:
        """Sorted set: queued jobs reserved for a warm worker, scored by the end of the wait."""
        return f"{self.prefix}:{{{model}}}:{INBOX}{worker}"

    def reserved(self, model: str) -> str:
        """Sorted set: every reserved job, scored by the end of its wait (then anyone steals)."""
        return f"{self.prefix}:{{{model}}}:reserved"

    def session(self, model: str, session: str) -> str:
        """String: the worker that served a session's last turn (``session`` is hashed)."""
        return f"{self.prefix}:{{{model}}}:{SESSION}{session}"

    def throughput(self, model: str) -> str:
        """Hash: worker id -> recent tokens/s for the model (admission reads it)."""
        return f"{self.prefix}:{{{model}}}:throughput"

    def stats(self, model: str) -> str:
        """Hash: the janitor's roll-up of live workers (tokens/s, capacity, in use, count)."""
        return f"{self.prefix}:{{{model}}}:stats"

    # --- global --------------------------------------------------------------------------
    def job_index(self, job_id: str) -> str:
        """String: job id -> model, so the job API can find a job's keys."""
        return f"{self.prefix}:jobidx:{job_id}"

    def rate_window(self, key_hash: str, limit: str) -> str:
        """Hash: an API key's sliding-window counts for one limit (``requests``, ``tokens``),
        field = minute number. Hash-tagged by the key so one charge's keys share a slot."""
        return f"{self.prefix}:ratelimit:{{{key_hash}}}:{limit}"

    def rate_charge(self, key_hash: str, request_id: str) -> str:
        """String: the answer a request's rate-limit charge got, so a replay returns it."""
        return f"{self.prefix}:ratelimit:{{{key_hash}}}:charge:{request_id}"

    def idempotency(self, tenant: str, key: str) -> str:
        """String: (tenant, Idempotency-Key) -> job id."""
        return f"{self.prefix}:idem:{tenant}:{key}"

    @property
    def workers(self) -> str:
        """Hash: worker id -> JSON registry entry (see ``WorkerInfo``)."""
        return f"{self.prefix}:workers"

    @property
    def workers_seen(self) -> str:
        """Sorted set: worker id scored by its last heartbeat (ms since the epoch)."""
        return f"{self.prefix}:workers:seen"

    @property
    def models(self) -> str:
        """Set: every model a worker has ever served."""
        return f"{self.prefix}:models"

    def api_key(self, key_hash: str) -> str:
        """Hash: an API key's tenant, models, priority ceiling and limits (by key hash)."""
        return f"{self.prefix}:apikey:{key_hash}"

    @property
    def api_keys(self) -> str:
        """Set: hashes of every API key."""
        return f"{self.prefix}:apikeys"

    @property
    def janitor_queue(self) -> str:
        """Sorted set: arq's queue of janitor cron jobs (arq keeps its own ``arq:*`` keys)."""
        return f"{self.prefix}:janitor:queue"

    @property
    def janitor_log(self) -> str:
        """Stream: one entry per janitor cron firing (task, arq job id, janitor, result)."""
        return f"{self.prefix}:janitor:log"
