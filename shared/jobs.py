"""``JobStore``: the typed face of the Lua scripts and the job keys, used by both services."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, Unpack

import structlog
from redis.exceptions import NoScriptError, RedisError

from shared import scripts
from shared.affinity import AffinityPolicy
from shared.job_records import Claimed, Emit, LogEntry, PullOptions, PullResult, pull_result
from shared.keys import CONSUMER_GROUP, Keys
from shared.models import EventBatch, Job, JobState, Priority
from shared.redis import RedisClient

log = structlog.get_logger("slipstream.jobs")
RENEW_BATCH = 1000  # leases per RENEW script (see ``JobStore.renew``)


def now_ms() -> int:
    return int(time.time() * 1000)


class JobStore:
    """Atomic job transitions (enqueue, pull, emit, cancel, renew) and event-log reads."""

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        *,
        ttl_s: int,
        fair_share_tokens: int = 0,
        affinity: AffinityPolicy | None = None,
        min_replicas: int = 0,
        replica_wait_ms: int = 500,
    ) -> None:
        self.redis = redis
        # WAIT after an enqueue and a job's end (docs/reliability.md): 0 waits for nothing
        self.min_replicas = min_replicas
        self.replica_wait_ms = replica_wait_ms
        self.keys = keys
        self.ttl_ms = ttl_s * 1000
        self.fair_share_tokens = fair_share_tokens
        self.affinity = affinity
        self.unreplicated = 0  # writes whose WAIT heard from fewer than min_replicas

    # --- gateway side -------------------------------------------------------------------
    def job_ttl_ms(self, job: Job) -> int:
        """How long a new job's state and index live: its whole time budget (a deadline may be
        up to 24 h away), then ``SLIPSTREAM_JOB_LOG_TTL_S`` to read the result."""
        budget = 0 if job.deadline_at_ms is None else job.deadline_at_ms - job.enqueued_at_ms
        return self.ttl_ms + max(0, budget)

    async def enqueue(self, job: Job, *, payload: str | None = None) -> str:
        """Store the job and append it to its queue; returns the queue entry id. ``payload``:
        the job's JSON when the caller has it already.

        The job-index entry and the script go out in one round trip. The script is called by
        its hash (a ``Script`` in a pipeline would add a ``SCRIPT EXISTS`` round trip); when
        Redis does not know it yet, the ``Script`` call loads it and runs it.
        """
        k, model, prio = self.keys, job.model, job.priority
        ttl_ms = self.job_ttl_ms(job)
        named: dict[str, Any] = dict(
            job=k.job(model, job.id),
            queue=k.queue(model, prio),
            backlog=k.backlog(model),
            fair=k.fair(model),
            share=k.share(model, prio),
            deferred=k.deferred(model, prio, job.tenant),
            job_id=job.id,
            payload=job.model_dump_json() if payload is None else payload,
            cost=job.cost_tokens,
            ttl=ttl_ms,
            group=CONSUMER_GROUP,
            prio=prio.value,
            tenant=k.tenant_part(job.tenant),
            quantum=self.fair_share_tokens,
            affinity=self.affinity.enqueue_arg(job) if self.affinity else "{}",
            need=job.need_bits,  # features a worker must implement to take it (0: none)
            deadline="" if job.deadline_at_ms is None else job.deadline_at_ms,
        )
        for attempt in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(k.job_index(job.id), job.model, px=ttl_ms)
                scripts.ENQUEUE.queue(pipe, **named)
                self._wait_replicas(pipe)  # on the connection that wrote: WAIT is per client
                replies = await pipe.execute(raise_on_error=False)
            if isinstance(replies[0], Exception):
                raise replies[0]
            entry = replies[1]
            if not (isinstance(entry, NoScriptError) and attempt == 0):
                break
            await scripts.ENQUEUE.load(self.redis)  # a restarted or new master
        if isinstance(entry, Exception):
            raise entry
        self._check_replicas(replies[2:], "enqueue", job.id)
        return str(entry)

    def _wait_replicas(self, pipe: Any) -> None:
        if self.min_replicas:
            pipe.execute_command("WAIT", self.min_replicas, self.replica_wait_ms)

    def _check_replicas(self, replies: Sequence[Any], what: str, job_id: str) -> None:
        """A WAIT that heard from fewer replicas than asked: the write stands (WAIT cannot
        undo it) but a failover now may lose it; said in the log, counted for metrics."""
        acked: Any = replies[-1] if replies else 0
        if self.min_replicas and (isinstance(acked, Exception) or int(acked) < self.min_replicas):
            self.unreplicated += 1
            log.warning("write_not_replicated", write=what, job_id=job_id, replicas=str(acked))

    async def cancel(
        self,
        model: str,
        job_id: str,
        *,
        state: JobState = JobState.CANCELLED,
        code: str = "cancelled",
        message: str = "the job was cancelled",
        status: int = 499,
    ) -> str:
        """Move a queued or running job to a terminal state; returns the state it ends in."""
        k = self.keys
        result = await scripts.CANCEL.call(
            self.redis,
            job=k.job(model, job_id),
            job_log=k.job_log(model, job_id),
            leases=k.leases(model),
            backlog=k.backlog(model),
            fair=k.fair(model),
            reserved=k.reserved(model),
            prefix=k.model_prefix(model),
            job_id=job_id,
            state=state.value,
            code=code,
            message=message,
            status=status,
            ttl=self.ttl_ms,
            group=CONSUMER_GROUP,
            control=k.control_channel(model),
            channel=k.job_channel(model, job_id),
        )
        return str(result)

    async def load_job(self, model: str, job_id: str) -> Job | None:
        payload = await self.redis.hget(self.keys.job(model, job_id), "payload")  # type: ignore[misc]
        return None if payload is None else Job.model_validate_json(payload)

    async def model_of(self, job_id: str) -> str | None:
        model = await self.redis.get(self.keys.job_index(job_id))
        return None if model is None else str(model)

    async def job_state(self, model: str, job_id: str) -> str | None:
        """The job's state, or None when Redis has no such job (expired, or lost in a crash)."""
        state = await self.redis.hget(self.keys.job(model, job_id), "state")  # type: ignore[misc]
        return None if state is None else str(state)

    async def state_and_log(
        self, model: str, job_id: str, after: str = "-", count: int | None = None
    ) -> tuple[str | None, int, list[LogEntry]]:
        """The job's state (None: no such job), its ``fence`` (the number of the latest claim)
        and what ``read_log`` returns, in one round trip. The state is read first: a terminal
        state means the log (appended by the same script) holds the terminal event."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.job(model, job_id), ["state", "fence"])
            pipe.xrange(self.keys.job_log(model, job_id), _log_start(after), "+", count=count)
            (state, fence), rows = await pipe.execute()
        return (None if state is None else str(state)), int(fence or 0), _log_entries(rows)

    async def state(self, model: str, job_id: str) -> dict[str, str]:
        result: dict[str, str] = await self.redis.hgetall(self.keys.job(model, job_id))  # type: ignore[misc]
        return result

    async def read_log(
        self, model: str, job_id: str, after: str = "-", count: int | None = None
    ) -> list[LogEntry]:
        """Event batches logged after stream id ``after`` (exclusive), oldest first."""
        key = self.keys.job_log(model, job_id)
        return _log_entries(await self.redis.xrange(key, _log_start(after), "+", count=count))

    # --- worker side --------------------------------------------------------------------
    async def pull(self, model: str, consumer: str, **options: Unpack[PullOptions]) -> PullResult:
        """Claim one job that fits, or say why not (``PullOptions`` says what the worker
        declares). ``pull_id`` names this call (a fresh one by default): when redis-py replays
        it after a lost reply, ``PULL`` returns the claim it made then instead of claiming a
        second job. ``caps`` is the bit mask of the features the worker's engine implements
        (``shared.capabilities``): a job needing more is left to a worker that has them."""
        named = self.pull_args(model, consumer, **options)
        return pull_result(await scripts.PULL.call(self.redis, **named))

    def pull_args(
        self, model: str, consumer: str, **options: Unpack[PullOptions]
    ) -> dict[str, Any]:
        """``PULL``'s keys and arguments (``pull``'s), for a caller that queues it on a
        pipeline (``scripts.PULL.queue``) and reads the reply with ``pull_result``."""
        o = options
        k = self.keys
        return dict(
            wake=k.wake(model),
            leases=k.leases(model),
            reserved=k.reserved(model),
            members=k.members(model),
            dead=k.dead_letter(model),
            backlog=k.backlog(model),
            fair=k.fair(model),
            me=k.worker_state(model, consumer),
            inbox=k.inbox(model, consumer),
            my_warm=k.warm(model, consumer),
            queues=k.queues(model),
            group=CONSUMER_GROUP,
            consumer=consumer,
            free=o["free_tokens"],
            seqs=o.get("free_seqs", 1),
            idle=1 if o["idle"] else 0,
            prefix=k.model_prefix(model),
            lease=o["lease_ms"],
            ttl=self.ttl_ms,
            max_deliveries=o["max_deliveries"],
            aging=json.dumps([o["aging_ms"].get(p, 0) for p in Priority.ordered()]),
            worker_ttl=o.get("worker_ttl_ms", 5000),
            pull_id=o.get("pull_id") or uuid.uuid4().hex,
            caps=o.get("caps", 0),
        )

    async def release(self, model: str, worker: str) -> int:
        """A worker leaves: its reservations end now, and it stops being a routing target."""
        k = self.keys
        released = await scripts.RELEASE.call(
            self.redis,
            inbox=k.inbox(model, worker),
            reserved=k.reserved(model),
            worker=k.worker_state(model, worker),
            warm=k.warm(model, worker),
            members=k.members(model),
            wake=k.wake(model),
            w=worker,
        )
        return int(released)

    async def emit(
        self,
        claimed: Claimed,
        batch: EventBatch,
        *,
        new_tokens: int,
        terminal: JobState | None = None,
    ) -> bool:
        """Log and publish a batch if the caller still holds the job; False when fenced off.

        True also when Redis had applied this very write already (a replay after a lost
        reply: nothing is appended twice), False when the batch does not start at the job's
        next sequence number."""
        named = self._emit_call(Emit(claimed, batch, new_tokens, terminal))
        return _written(await scripts.EMIT.call(self.redis, **named))

    async def emit_many(self, emits: Sequence[Emit]) -> list[bool | Exception]:
        """Several jobs' batches in one round trip (a pipeline of ``EMIT`` calls by hash);
        for each, whether it was written (False: fenced off) or the error it met. Only the
        calls Redis refused with ``NOSCRIPT`` are sent again, after loading the script."""
        calls = [self._emit_call(e) for e in emits]
        results: list[bool | Exception] = [False] * len(calls)
        todo = list(range(len(calls)))
        ends = [e.claimed.job.id for e in emits if e.terminal is not None]
        for attempt in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in todo:
                    scripts.EMIT.queue(pipe, **calls[i])
                if ends:  # a job's end waits for replicas (its tokens ride along)
                    self._wait_replicas(pipe)
                replies = await pipe.execute(raise_on_error=False)
            if ends and self.min_replicas:
                self._check_replicas(replies[-1:], "end", ",".join(ends))
                replies = replies[:-1]
            missing = []
            for i, reply in zip(todo, replies, strict=True):
                if isinstance(reply, NoScriptError) and attempt == 0:
                    missing.append(i)
                else:
                    results[i] = reply if isinstance(reply, Exception) else _written(reply)
            if not missing:
                break
            await scripts.EMIT.load(self.redis)
            todo = missing
        return results

    def _emit_call(self, emit: Emit) -> dict[str, Any]:
        job, k, events = emit.claimed.job, self.keys, emit.batch.events
        # the job's seq before this batch: its first numbered event is the next one (a
        # ``started`` event repeats the seq before it)
        numbered = [e.s for e in events if e.t != "started"]
        before = numbered[0] - 1 if numbered else events[-1].s
        return dict(
            job=k.job(job.model, job.id),
            job_log=k.job_log(job.model, job.id),
            leases=k.leases(job.model),
            fence=emit.claimed.fence,
            channel=k.job_channel(job.model, job.id),
            batch=_fenced(emit.batch, emit.claimed.fence).model_dump_json(exclude_none=True),
            last_seq=emit.batch.events[-1].s,
            new_tokens=emit.new_tokens,
            ttl=self.ttl_ms,
            terminal=emit.terminal.value if emit.terminal else "",
            group=CONSUMER_GROUP,
            job_id=job.id,
            seq_before=before,
        )

    async def renew(self, model: str, leases: dict[str, int], lease_ms: int) -> dict[str, bool]:
        """Extend the leases of ``{job id: fence}``; maps each job to whether it is still ours.

        ``RENEW_BATCH`` leases per script: a script's lists are bounded (``scripts.MAX_TAIL``),
        and a shorter script lets other clients' commands in between (10,000 leases in one
        script would hold Redis for ~40 ms: 3.7 ms per 1,000 measured). A batch that fails
        leaves its jobs out of the map (not judged) and the others still go out; it raises
        only when every batch failed."""
        held: dict[str, bool] = {}
        ids = list(leases)
        failure: RedisError | OSError | None = None
        for start in range(0, len(ids), RENEW_BATCH):
            batch = ids[start : start + RENEW_BATCH]
            try:
                reply = await scripts.RENEW.call(
                    self.redis,
                    leases=self.keys.leases(model),
                    jobs=[self.keys.job(model, i) for i in batch],
                    lease_ms=lease_ms,
                    id_fences=[x for i in batch for x in (i, leases[i])],
                )
            except (RedisError, OSError) as exc:  # the other batches still go out
                failure = exc
                continue
            held.update((i, bool(r)) for i, r in zip(batch, reply, strict=True))
        if failure is not None and not held:
            raise failure
        if failure is not None:
            log.warning(
                "renew_partly_failed", error=str(failure), renewed=len(held), leases=len(ids)
            )
        return held

    async def sweep_expired_leases(self, model: str) -> list[str]:
        """Tidy expired leases no worker took over (janitor): stale ones, past deadlines."""
        k = self.keys
        reply = await scripts.SWEEP.call(
            self.redis,
            leases=k.leases(model),
            prefix=k.model_prefix(model),
            group=CONSUMER_GROUP,
            ttl=self.ttl_ms,
        )
        return [str(x) for x in reply]

    async def handback(self, claimed: Claimed) -> bool:
        """Give a job back for immediate takeover by another worker (graceful drain)."""
        job, k = claimed.job, self.keys
        ok = await scripts.HANDBACK.call(
            self.redis,
            job=k.job(job.model, job.id),
            leases=k.leases(job.model),
            wake=k.wake(job.model),
            fence=claimed.fence,
            job_id=job.id,
        )
        return bool(ok)


def _log_start(after: str) -> str:
    """The ``XRANGE`` start for log entries after stream id ``after`` (exclusive; ``-``: all)."""
    return "-" if after == "-" else f"({after}"


def _log_entries(rows: Any) -> list[LogEntry]:
    return [LogEntry(sid, EventBatch.model_validate_json(f["e"])) for sid, f in rows]


def _fenced(batch: EventBatch, fence: int) -> EventBatch:
    """``batch`` stamped with the fence of the claim that writes it (what the gateway checks a
    pub/sub batch against; ``EMIT`` checks the same fence before it logs and publishes)."""
    return batch if batch.f == fence else batch.model_copy(update={"f": fence})


def _written(reply: Any) -> bool:
    """``EMIT``'s reply: 1 written, 2 written already (a replay), 0 fenced off, -1 out of
    sequence."""
    return int(reply) in (1, 2)


__all__ = [
    "Claimed",
    "Emit",
    "JobStore",
    "LogEntry",
    "PullResult",
    "now_ms",
    "read_backlog",
]


async def read_backlog(
    redis: RedisClient, keys: Keys, model: str
) -> dict[Priority, tuple[int, int]]:
    """Queued (tokens, jobs) per priority for ``model``: what admission weighs a request against."""
    raw: dict[str, str] = await redis.hgetall(keys.backlog(model))  # type: ignore[misc]
    return {
        p: (int(raw.get(f"{p.value}:tokens", 0)), int(raw.get(f"{p.value}:jobs", 0)))
        for p in Priority.ordered()
    }
