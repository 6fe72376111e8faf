"""One accepted job seen from the gateway: enqueue, follow its events, enforce its deadline.

Every outcome arrives as an event from the job's log, including the ones the gateway decides
(deadline passed, no worker, client gone): the gateway moves the job to a terminal state with
the ``CANCEL`` script, which appends the error event, so there is one path to the client.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from types import TracebackType

import structlog
from redis.exceptions import RedisError

from gateway.job_events import JobEvents
from gateway.metrics import RequestObserver
from gateway.multiplexer import PubSubMultiplexer
from shared.clock import RedisClock
from shared.fleet import live_workers
from shared.jobs import JobStore
from shared.models import Event, Job, JobState

log = structlog.get_logger("slipstream.gateway")


class Dispatch:
    __slots__ = (
        "cancel_on_exit",
        "clock",
        "created",
        "events",
        "first_token_at",
        "job",
        "observer",
        "payload",
        "serves",
        "stall_timeout_s",
        "started",
        "started_at",
        "store",
        "submit",
        "unsent",
        "worker_ttl_s",
        "worker_wait_s",
    )

    def __init__(
        self,
        store: JobStore,
        mux: PubSubMultiplexer,
        job: Job,
        *,
        worker_wait_s: float,
        stall_timeout_s: float,
        worker_ttl_s: float,
        submit: bool = True,
        cancel_on_exit: bool = True,
        after_seq: int = 0,
        clock: RedisClock | None = None,
        serves: Callable[[str], bool] | None = None,
    ) -> None:
        self.store = store
        # A stream lives for minutes and there may be 10,000: it keeps of its job only what it
        # reads (``JobRef``), and once the job is in Redis, the JSON sent there (to submit it
        # again if Redis loses it), not the ``Job`` model (~2 KB more per stream).
        self.job = job.ref()
        self.unsent: Job | None = job if submit else None  # until ``open`` enqueues it
        self.payload: str | None = None
        self.worker_wait_s = worker_wait_s
        self.stall_timeout_s = stall_timeout_s
        self.worker_ttl_s = worker_ttl_s
        self.submit = submit
        self.clock = clock or RedisClock()
        self.cancel_on_exit = cancel_on_exit
        self.events = JobEvents(store, mux, job.model, job.id, after_seq=after_seq, fresh=submit)
        self.started = False
        self.created = time.monotonic()
        self.first_token_at: float | None = None
        self.started_at: float | None = None
        self.observer: RequestObserver | None = None  # metrics, set by the OpenAI routes
        # the gateway's view of the registry (``Admission.serves``), a refresh old: a stream
        # waiting for a worker asks it every second, and reads the registry itself only when
        # it says no, before failing the job (thousands of queued streams each reading the
        # registry every second took a tenth of the gateway's CPU at 10,000 streams)
        self.serves = serves

    @property
    def finished(self) -> bool:
        return self.events.finished

    # A dispatch outlives the route that opens it: a streamed response returns at once and
    # the relay closes the dispatch when the stream ends. So ``open`` and ``close`` are the
    # interface (``gateway/streaming.py``); ``async with`` is for callers whose use fits in a
    # block.
    async def open(self) -> None:
        """Listen first, then enqueue when submitting (no event can be missed)."""
        await self.events.__aenter__()
        if self.unsent is not None:
            payload = self.unsent.model_dump_json()
            try:
                await self.store.enqueue(self.unsent, payload=payload)
            except BaseException:
                await self.events.__aexit__(None, None, None)
                raise
            self.unsent, self.payload = None, payload

    async def close(self) -> None:
        """Leave the job: cancel it if unfinished and ``cancel_on_exit``; stop listening."""
        try:
            if not self.finished and self.cancel_on_exit:
                await self.store.cancel(self.job.model, self.job.id, message="the client went away")
        except (RedisError, OSError) as exc:  # the job runs on unheard; its log keeps it
            log.warning("cancel_failed", job_id=self.job.id, error=str(exc))
        finally:
            if self.observer is not None:
                self.observer.on_exit(self)
            await self.events.__aexit__(None, None, None)

    async def __aenter__(self) -> Dispatch:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def next(self, timeout: float = 1.0, *, slide: float = 0.0) -> list[Event]:
        """The next events; ``[]`` after ``timeout`` seconds of quiet (time for a progress note).
        ``slide``: while the inline relay writes, the wait lasts until ``slide`` seconds after
        its last write instead (``Listener.wait_until``)."""
        end = time.monotonic() + timeout
        while not self.finished:
            try:
                if self._past_deadline():
                    await self._expire()
                now = time.monotonic()
                hard = now + self._left_s()
                wake = min(end, self._check_at(now), hard)
                # every deadline but the job's own moves on with each event: the relay's quiet
                # (``timeout``), the stall check, the log's belt
                slid = min(slide, self.stall_timeout_s) if slide and self.started else 0.0
                events = await self.events.next_until(wake, slide=slid, hard=hard)
                if events:
                    self.note(events)
                    return events
                await self._enforce_limits()
            except (RedisError, OSError) as exc:  # Redis restarting: the log has it all
                log.warning("redis_unavailable", job_id=self.job.id, error=str(exc))
                self.events.needs_log = True
                await asyncio.sleep(0.2)
            if time.monotonic() >= end:
                return []
        return []

    def _check_at(self, now: float) -> float:
        """When ``_enforce_limits`` must look next, at the latest: once the wait for a worker
        is over and every second after, until the job starts (a watcher enforces no such
        wait); then once it could have stalled. A job Redis lost is acted on when the belt's
        log read finds it, which ends the wait at once; the deadline is the wait's ``hard``
        end. Not every second of every stream: at 10,000 streams those wake-ups were as many
        as the events, and a queued stream woke every second even before there was anything
        to check."""
        if not self.started:
            if not self.submit:
                return math.inf
            waited_at = self.created + self.worker_wait_s + 0.002  # a hair past it
            return waited_at if now < waited_at else now + 1.0
        return max(self.events.last_event_at + self.stall_timeout_s, now + 1.0)

    def note(self, events: Sequence[Event]) -> None:
        """Bookkeeping for events on their way to the client (the relay's or the inline
        relay's): the start, the first token, the request's metrics."""
        self.started = True
        for event in events:
            if event.t == "started" and self.started_at is None:
                self.started_at = time.monotonic()
            elif event.t == "token" and self.first_token_at is None:
                self.first_token_at = time.monotonic()
        if self.observer is not None:
            self.observer.on_events(events)

    def _left_s(self) -> float:
        """Seconds until the deadline (a hair past it, so a wake-up finds it passed)."""
        deadline = self.job.deadline_at_ms
        if deadline is None:
            return math.inf
        return max(0.0, (deadline - self.clock.now_ms()) / 1000) + 0.002

    def _past_deadline(self) -> bool:
        deadline = self.job.deadline_at_ms
        return deadline is not None and self.clock.now_ms() >= deadline and not self.finished

    async def _expire(self) -> None:
        """The whole request's time budget is spent: stop it (an error event follows)."""
        await self.store.cancel(
            self.job.model,
            self.job.id,
            state=JobState.EXPIRED,
            code="deadline_exceeded",
            message="the request's deadline passed before it finished",
            status=504,
        )

    async def _fail(self, code: str, message: str, status: int) -> None:
        """End the job as failed (the ``CANCEL`` script logs the error event that ends us)."""
        job = self.job
        await self.store.cancel(
            job.model, job.id, state=JobState.FAILED, code=code, message=message, status=status
        )

    async def _worker_live(self) -> bool:
        """A live worker serves the job's model: the gateway's view says so, or failing that
        the registry itself (the view may be a refresh old)."""
        if self.serves is not None and self.serves(self.job.model):
            return True
        workers = await live_workers(self.store.redis, self.store.keys, self.worker_ttl_s)
        return any(w.model == self.job.model for w in workers)

    async def _enforce_limits(self) -> None:
        job, store = self.job, self.store
        if self.payload is not None and self.events.gone:
            # Redis lost the job (a restart inside the AOF fsync window): submit it again.
            # Sequence numbers start over; events this stream already passed on are dropped.
            # Found by the log read a quiet stream makes every ``poll_s`` anyway (which then
            # ends the wait), not by a read of its own: at 10,000 streams that read was a
            # quarter of the gateway's CPU.
            log.warning("job_resubmitted", job_id=job.id, request_id=job.request_id)
            await store.enqueue(Job.model_validate_json(self.payload), payload=self.payload)
            self.events.gone = False
            return
        if self._past_deadline():
            await self._expire()
            return
        waited = time.monotonic() - self.created
        # only the submitting request enforces the wait for a worker: someone watching a job
        # (``GET /v1/jobs/{id}/events``) must not fail it because no worker is live right now
        late = self.submit and not self.started and waited >= self.worker_wait_s
        if late and not await self._worker_live():
            message = f"no worker is serving model {job.model!r}; try again later"
            await self._fail("no_worker_available", message, 503)
            return
        silent = time.monotonic() - self.events.last_event_at
        if self.started and silent >= self.stall_timeout_s:
            await self._fail("worker_stalled", f"no output for {self.stall_timeout_s:.0f} s", 504)
