"""Deadline-aware admission: refuse early (429 + an honest Retry-After) what cannot finish.

The estimate for a new job of priority P, model M (docs/admission.md has the worked rules):

- ``ahead``: tokens (prompt estimate + max_tokens) already queued for M at P and above, from
  the backlog hash the Lua transitions keep (one ``HGETALL`` per request);
- ``rate``: the drain rate of M's live workers, each worker's measured backlog drained per
  second in the unit of ``ahead`` (registry ``drain_tokens_per_s``, see
  ``worker.job_runner.Throughput``; refreshed every ``admission_refresh_s`` in the
  background) held at its recent best, decaying
  with half-life ``throughput_memory_s``: a worker that is not saturated measures less than it
  can do, and the best it did recently is a better guess of what it will do under a burst;
  less the tokens/s this gateway admitted above P over the last 5 s (they will jump ahead);
- ``own``: the job's max_tokens at the speed one sequence reaches (``seq_tokens_per_s``).

finish = ahead / rate + own. If finish is past the deadline the request gets a 429 whose
Retry-After is the seconds until enough of ``ahead`` drains (finish - budget, rounded up, at
least 1). While nothing is measured yet (no rate: a fresh fleet), a capacity estimate stands in
(``seq_tokens_per_s`` x ``max_seqs``, also a floor under each worker's measured rate: a
lightly loaded worker measures its load, not its capacity); with neither, the request is
admitted (the dispatcher's own deadline and no-worker rules still apply). A job that could
not finish in time even on an idle fleet (``own`` > budget) is a 400 ``deadline_too_short``:
waiting would not help.

Queue limits bound the backlog without deadlines: per model, jobs and tokens queued at all
priorities; low may fill ``1 - 2 x queue_reserve`` of them, normal ``1 - queue_reserve``, high
all, so a queue full of low work still takes high work. A prompt longer than the context the
model's workers advertise (``context_tokens``) is a 400 ``context_length_exceeded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import structlog
from redis.exceptions import RedisError

from gateway.backlog_cache import BacklogCache
from gateway.queue_scan import QueueScan
from gateway.settings import GatewaySettings
from shared.aio import cancel_and_wait
from shared.capabilities import Capabilities, Feature, first_missing, known
from shared.clock import RedisClock
from shared.errors import InvalidRequest, Overloaded
from shared.fleet import live_workers
from shared.jobs import read_backlog
from shared.keys import Keys
from shared.models import Job, JobRef, JobState, Priority, WorkerInfo
from shared.redis import RedisClient

log = structlog.get_logger("slipstream.gateway")
INFLOW_WINDOW_S = 5.0  # admitted tokens per priority are counted over this window


@dataclass(frozen=True, slots=True)
class Fleet:
    """What admission knows about one model's live workers."""

    workers: int = 0
    rate: float = 0.0  # tokens/s the fleet drains: per worker, best measured or seqs x speed
    seq_speed: float = 0.0  # tokens/s of one sequence (0: unknown)
    seqs: int = 0
    context_tokens: int = 0  # smallest advertised context (0: some worker does not say)
    # each live worker's (shared.capabilities); not part of the fleet's figures' equality
    capabilities: tuple[Capabilities, ...] = field(default=(), compare=False)

    @property
    def drain_rate(self) -> float:
        """Measured rate, or the capacity estimate while nothing was measured (0: unknown)."""
        return self.rate or self.seq_speed * self.seqs


class QueuePosition(NamedTuple):
    position: int  # queued jobs served before this one (0: it is next)
    eta_ms: int | None  # estimated time until it starts (None: no throughput known yet)


class Inflow:
    """Tokens admitted over the last ``INFLOW_WINDOW_S``, kept as a running sum: every queued
    stream's progress note asks, and summing the window each time cost ~100 µs during a
    ramp of 500 requests a second."""

    __slots__ = ("total", "window")

    def __init__(self) -> None:
        self.window: deque[tuple[float, int]] = deque()
        self.total = 0

    def add(self, now: float, tokens: int) -> None:
        self.window.append((now, tokens))
        self.total += tokens
        self._expire(now)

    def rate(self, now: float) -> float:
        self._expire(now)
        return self.total / INFLOW_WINDOW_S

    def _expire(self, now: float) -> None:
        while self.window and self.window[0][0] < now - INFLOW_WINDOW_S:
            self.total -= self.window.popleft()[1]


class Admission:
    def __init__(self, redis: RedisClient, keys: Keys, settings: GatewaySettings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.fleets: dict[str, Fleet] = {}
        self.best: dict[str, tuple[float, float]] = {}  # worker id -> (best rate, when)
        self.admitted: dict[tuple[str, Priority], Inflow] = {}
        self.backlogs = BacklogCache(redis, keys, settings.admission_backlog_max_age_s)
        self.scans = QueueScan(redis)
        self._task: asyncio.Task[None] | None = None
        self.clock = RedisClock()  # deadlines are stamped and judged on Redis's time

    # --- the registry, read in the background ---------------------------------------------
    async def start(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.refresh()
        self._task = asyncio.create_task(self._refresh_loop(), name="admission-refresh")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.admission_refresh_s)
            try:
                await self.refresh()
            except Exception as exc:  # a malformed registry entry too: the loop lives on
                log.warning("admission_refresh_failed", error=str(exc))

    async def refresh(self) -> None:
        await self.clock.sync(self.redis)
        workers = await live_workers(self.redis, self.keys, self.settings.worker_ttl_s)
        self.fleets = summarize(workers, self._remembered_rates(workers))

    def _remembered_rates(self, workers: list[WorkerInfo]) -> dict[str, float]:
        """Each worker's best measured rate, halving every ``throughput_memory_s``."""
        now = time.monotonic()
        half_life = self.settings.throughput_memory_s
        best = {}
        for w in workers:
            old, at = self.best.get(w.id, (0.0, now))
            rate = w.drain_tokens_per_s or w.tokens_per_s  # the backlog's unit (older: tokens)
            best[w.id] = (max(rate, old * 0.5 ** ((now - at) / half_life)), now)
        self.best = best
        return {wid: rate for wid, (rate, _) in best.items()}

    def fleet(self, model: str) -> Fleet:
        return self.fleets.get(model, Fleet())

    def serves(self, model: str) -> bool:
        """Whether a live worker (draining or not) served ``model`` at the last refresh
        (``summarize`` keeps a fleet, if an empty one, for every live worker's model)."""
        return model in self.fleets

    # --- admission ------------------------------------------------------------------------
    async def check(self, job: Job) -> None:
        """Raise ``InvalidRequest`` or ``Overloaded`` for a job that should not be queued."""
        if job.features is not None:
            await self._check_features(job)
        if not self.settings.admission:
            return
        fleet = self.fleet(job.model)
        if fleet.context_tokens and job.prompt_tokens_estimate > fleet.context_tokens:
            raise InvalidRequest(
                f"the prompt is about {job.prompt_tokens_estimate} tokens; the model's context "
                f"is {fleet.context_tokens} tokens",
                param="messages" if job.kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        backlog = await self.backlogs.get(job.model)
        self._check_queue_limits(job, fleet, backlog)
        self._check_deadline(job, fleet, backlog)

    async def _check_features(self, job: Job) -> None:
        """400 naming the parameter unless one live worker of the model implements every
        feature the job needs. The snapshot may be a refresh old: a refusal reads the
        registry again first (a worker that just started), so only refused requests pay."""
        needs = job.needs()
        for fresh in (False, True):
            if fresh:
                workers = await live_workers(self.redis, self.keys, self.settings.worker_ttl_s)
                mine = [w for w in workers if w.model == job.model]
                caps = [known(w.capabilities) for w in mine if w.healthy and not w.draining]
            else:
                caps = list(self.fleet(job.model).capabilities)
            if any(needs <= have for have in caps):
                return
        union: Capabilities = frozenset().union(*caps)
        missing = first_missing(needs, union)
        if missing is None:  # each is somewhere, but no one worker has them all
            names = ", ".join(f"`{f.value}`" for f in Feature if f in needs)
            message = f"no live worker of model {job.model!r} supports {names} together"
            missing = next(iter(needs))
        else:
            kind = "" if missing.param == missing.value else f" ({missing.value})"
            message = f"no live worker of model {job.model!r} supports `{missing.param}`{kind}"
        raise InvalidRequest(message, param=missing.param, code="unsupported_parameter")

    def admit(self, job: Job) -> None:
        """Count a job that passed ``check`` and every other gate (rate limits) as admitted:
        it joins this gateway's inflow and its backlog estimate. A request refused after
        ``check`` (by its rate limit) is never counted, so it cannot push others out."""
        if not self.settings.admission:
            return
        self._note_admitted(job)
        self.backlogs.add(job.model, job.priority, job.cost_tokens)

    def _note_admitted(self, job: Job) -> None:
        window = self.admitted.setdefault((job.model, job.priority), Inflow())
        window.add(time.monotonic(), job.cost_tokens)

    def inflow(self, model: str, priority: Priority) -> float:
        """Tokens/s this gateway admitted lately for ``model`` at ``priority``."""
        window = self.admitted.get((model, priority))
        return window.rate(time.monotonic()) if window else 0.0

    def rate_for(self, model: str, priority: Priority) -> float:
        """The drain rate left for ``priority``: what higher priorities keep arriving at jumps
        the queue, so it comes off the fleet's rate (never below a tenth of it)."""
        rate = self.fleet(model).drain_rate
        higher = sum(self.inflow(model, p) for p in Priority.ordered()[: priority.rank])
        return max(rate - higher, 0.1 * rate)

    def _check_queue_limits(
        self, job: Job, fleet: Fleet, backlog: dict[Priority, tuple[int, int]]
    ) -> None:
        s = self.settings
        limit = s.queue_limits.get(job.model)
        max_jobs = limit.jobs if limit else s.max_queue_jobs
        max_tokens = limit.tokens if limit else s.max_queue_tokens
        share = 1.0 - s.queue_reserve * job.priority.rank
        tokens = sum(max(0, t) for t, _ in backlog.values())
        jobs = sum(max(0, n) for _, n in backlog.values())
        excess = 0.0  # tokens that must drain before this job fits
        if max_tokens and tokens + job.cost_tokens > max_tokens * share:
            excess = tokens + job.cost_tokens - max_tokens * share
        if max_jobs and jobs + 1 > max_jobs * share:
            per_job = tokens / jobs if jobs else job.cost_tokens
            excess = max(excess, (jobs + 1 - max_jobs * share) * per_job)
        if excess <= 0:
            return
        wait = retry_after(excess / fleet.drain_rate if fleet.drain_rate else 1.0)
        raise Overloaded(
            f"the queue of {job.model!r} is full for {job.priority.value} priority "
            f"({jobs} jobs, {tokens} tokens queued); retry in {wait} s",
            code="queue_full",
            headers={"Retry-After": str(wait)},
        )

    def _check_deadline(
        self, job: Job, fleet: Fleet, backlog: dict[Priority, tuple[int, int]]
    ) -> None:
        if job.deadline_at_ms is None or fleet.seq_speed == 0:
            # no sequence finished yet: what the fleet measured is its first load (a few
            # tokens over its first seconds), not its capacity; refusing on it turned a young
            # fleet's first burst of long prompts away (the dispatcher's deadline still holds)
            return
        rate = self.rate_for(job.model, job.priority)
        ahead = sum(max(0, t) for p, (t, _) in backlog.items() if p.rank <= job.priority.rank)
        wait_s = ahead / rate if rate else 0.0
        own_s = job.params.max_tokens / fleet.seq_speed if fleet.seq_speed else 0.0
        budget_s = (job.deadline_at_ms - self.clock.now_ms()) / 1000
        if wait_s + own_s <= budget_s:
            return
        if own_s > budget_s:
            raise InvalidRequest(
                f"{job.params.max_tokens} tokens take about {own_s:.1f} s at this model's "
                f"speed; the deadline allows {budget_s:.1f} s: raise the deadline or lower "
                "max_tokens",
                param="deadline_ms",
                code="deadline_too_short",
            )
        wait = retry_after(wait_s + own_s - budget_s)
        raise Overloaded(
            f"the queue ahead of this request needs about {wait_s:.1f} s and the deadline "
            f"allows {budget_s:.1f} s; retry in {wait} s",
            code="deadline_unattainable",
            headers={"Retry-After": str(wait)},
        )

    # --- queue position ---------------------------------------------------------------------
    async def position(self, job: JobRef, max_age_s: float = 0.0) -> QueuePosition | None:
        """Where a queued job stands: jobs ahead (higher priorities, then older ones of its
        own) and an estimated start. None when it is not queued (any more). The queue and
        backlog it counts may be up to ``max_age_s`` old (``QueueScan``); the job's own
        state and entry are read now."""
        k = self.keys
        fields = ["state", "queue", "entry", "rsv"]
        state, queue, entry, reserved = await self.redis.hmget(k.job(job.model, job.id), fields)  # type: ignore[misc]
        if state != JobState.QUEUED.value:
            return None
        if reserved:  # read from the queue and held for a worker (affinity): next in line
            ahead: tuple[int, int] | None = (0, 0)
        else:
            ahead = (await self.scans.get(queue, max_age_s)).ahead(entry)
        if ahead is None:
            return None
        jobs, tokens = ahead
        if max_age_s > 0:
            backlog = await self.backlogs.get(job.model)
        else:
            backlog = await read_backlog(self.redis, k, job.model)
        for p in Priority.ordered()[: job.priority.rank]:
            queued_tokens, queued_jobs = backlog.get(p, (0, 0))
            jobs, tokens = jobs + max(0, queued_jobs), tokens + max(0, queued_tokens)
        rate = self.rate_for(job.model, job.priority)
        return QueuePosition(jobs, round(1000 * tokens / rate) if rate else None)

    async def progress(self, job: JobRef) -> bytes:
        """An SSE comment for a queued stream (SSE clients and the openai SDK skip comments);
        empty when the job is not queued."""
        try:
            where = await self.position(job, max_age_s=self.settings.progress_s)
        except (RedisError, OSError):
            return b""
        if where is None:
            return b""
        eta = "" if where.eta_ms is None else f" eta_ms={where.eta_ms}"
        return f": queued position={where.position}{eta}\n\n".encode()


def retry_after(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def summarize(workers: list[WorkerInfo], rates: dict[str, float]) -> dict[str, Fleet]:
    """One ``Fleet`` per model from the live workers (draining ones take no new work)."""
    out: dict[str, Fleet] = {}
    for model in {w.model for w in workers}:
        mine = [w for w in workers if w.model == model and not w.draining and w.healthy]
        seqs = sum(w.max_seqs for w in mine)
        timed = [w for w in mine if w.seq_tokens_per_s > 0]
        weight = sum(w.max_seqs for w in timed)
        speed = sum(w.seq_tokens_per_s * w.max_seqs for w in timed) / weight if weight else 0.0
        contexts = [w.context_tokens for w in mine]
        out[model] = Fleet(
            workers=len(mine),
            rate=sum(
                max(
                    rates.get(w.id, w.drain_tokens_per_s or w.tokens_per_s),
                    w.seq_tokens_per_s * w.max_seqs,
                )
                for w in mine
            ),
            seq_speed=speed,
            seqs=seqs,
            context_tokens=min(contexts) if contexts and all(contexts) else 0,
            capabilities=tuple(known(w.capabilities) for w in mine),
        )
    return out
