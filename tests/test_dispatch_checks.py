"""A quiet stream's checks cost no Redis read of their own: a job Redis lost is found by the
log read every quiet stream makes, and the wait for a worker asks the gateway's view of the
registry, reading the registry itself only before it fails a job."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis

from gateway.dispatch import Dispatch
from gateway.multiplexer import PubSubMultiplexer
from shared.jobs import JobStore, now_ms
from shared.keys import Keys
from shared.models import ErrorEvent, Event, WorkerInfo
from tests.helpers import make_job
from worker.registry import Registry

KEYS = Keys()


@pytest.fixture
async def mux(redis: Redis) -> AsyncIterator[PubSubMultiplexer]:
    mux = PubSubMultiplexer(redis, queue_size=16)
    await mux.start()
    try:
        yield mux
    finally:
        await mux.close()


def dispatch_for(
    redis: Redis,
    mux: PubSubMultiplexer,
    serves: Callable[[str], bool] | None = None,
    worker_wait_s: float = 0.0,
) -> Dispatch:
    store = JobStore(redis, KEYS, ttl_s=60)
    dispatch = Dispatch(
        store,
        mux,
        make_job(),
        worker_wait_s=worker_wait_s,
        stall_timeout_s=3600.0,
        worker_ttl_s=5.0,
        serves=serves,
        cancel_on_exit=False,
    )
    dispatch.events.poll_s = 0.5  # the belt's period, shortened for the test
    return dispatch


async def events_for(dispatch: Dispatch, seconds: float) -> list[Event]:
    """What ``next`` returns within ``seconds`` (bounded: it stops at the first events)."""
    end = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < end and not dispatch.finished:
        if events := await dispatch.next(timeout=0.5):
            return events
    return []


async def test_a_job_redis_lost_is_submitted_again(redis: Redis, mux: PubSubMultiplexer) -> None:
    dispatch = dispatch_for(redis, mux, serves=lambda _model: True)
    job, sent = dispatch.job, dispatch.unsent
    await dispatch.open()
    try:
        assert dispatch.unsent is None  # the stream keeps the job's JSON, not its model
        assert await dispatch.store.job_state(job.model, job.id) == "queued"
        await redis.flushdb()  # Redis came back without it (the AOF's last second)
        for _ in range(20):  # bounded: 10 s
            if await dispatch.store.job_state(job.model, job.id) is not None:
                break
            await dispatch.next(timeout=0.5)
        assert await dispatch.store.job_state(job.model, job.id) == "queued"
        assert await redis.xlen(KEYS.queue(job.model, job.priority)) == 1
        assert await dispatch.store.load_job(job.model, job.id) == sent  # the same job again
    finally:
        await dispatch.close()


async def test_a_running_job_redis_lost_is_submitted_again_within_the_belt(
    redis: Redis, mux: PubSubMultiplexer
) -> None:
    """A running stream waits until its next ping (15 s), not a second at a time; the belt's
    log read that finds the job gone ends that wait, so the job is resubmitted at once."""
    dispatch = dispatch_for(redis, mux, serves=lambda _model: True)
    job = dispatch.job
    await dispatch.open()
    waiting = asyncio.ensure_future(dispatch.next(timeout=8.0))  # a relay's wait for a ping
    try:
        dispatch.started = True  # tokens were flowing when Redis lost the job
        dispatch.events.last_event_at = time.monotonic()
        await redis.flushdb()
        began = time.monotonic()
        while time.monotonic() - began < 5.0:  # bounded
            if await dispatch.store.job_state(job.model, job.id) is not None:
                break
            await asyncio.sleep(0.05)
        assert await dispatch.store.job_state(job.model, job.id) == "queued"
        assert time.monotonic() - began < 3.0  # the belt is 0.5 s here
    finally:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await dispatch.close()


async def live_worker(redis: Redis, model: str) -> None:
    now = now_ms()
    info = WorkerInfo(
        id="w-live",
        host="test",
        pid=1,
        model=model,
        engine="sim",
        capacity_tokens=8192,
        max_seqs=4,
        started_at_ms=now,
        heartbeat_at_ms=now,
    )
    await Registry(redis, KEYS, info).beat()


async def test_the_gateway_view_answers_while_it_says_a_worker_serves(
    redis: Redis, mux: PubSubMultiplexer
) -> None:
    """No worker is registered, but the view (a refresh old) still says one serves: the
    stream waits on without reading the registry."""
    asked: list[str] = []
    dispatch = dispatch_for(redis, mux, serves=lambda model: asked.append(model) is None)
    await dispatch.open()
    try:
        assert await events_for(dispatch, 1.5) == []
        assert asked and set(asked) == {dispatch.job.model}
        assert await dispatch.store.job_state(dispatch.job.model, dispatch.job.id) == "queued"
    finally:
        await dispatch.close()


@pytest.mark.parametrize("registered", [False, True])
async def test_the_registry_is_read_before_a_job_fails_for_want_of_a_worker(
    redis: Redis, mux: PubSubMultiplexer, registered: bool
) -> None:
    """The view says no worker: the registry decides (a worker that just started keeps the
    job; none fails it with ``no_worker_available``)."""
    dispatch = dispatch_for(redis, mux, serves=lambda _model: False)
    if registered:
        await live_worker(redis, dispatch.job.model)
    await dispatch.open()
    try:
        events = await events_for(dispatch, 2.0)
        state = await dispatch.store.job_state(dispatch.job.model, dispatch.job.id)
        if registered:
            assert events == [] and state == "queued"
        else:
            assert [e.code for e in events if isinstance(e, ErrorEvent)] == ["no_worker_available"]
            assert state == "failed"
    finally:
        await dispatch.close()


async def test_a_queued_stream_checks_its_limits_once_the_wait_for_a_worker_is_over(
    redis: Redis, mux: PubSubMultiplexer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until the wait for a worker is over there is nothing to check (the deadline ends the
    wait by itself): no wake-up a second before the job fails for want of a worker."""
    checks: list[float] = []
    enforce = Dispatch._enforce_limits

    async def counted(self: Dispatch) -> None:
        checks.append(time.monotonic())
        await enforce(self)

    monkeypatch.setattr(Dispatch, "_enforce_limits", counted)
    dispatch = dispatch_for(redis, mux, serves=lambda _model: False, worker_wait_s=2.5)
    dispatch.events.poll_s = 60.0  # no belt read in between
    await dispatch.open()
    try:
        events = await dispatch.next(timeout=6.0)
        took = time.monotonic() - dispatch.created
        assert [e.code for e in events if isinstance(e, ErrorEvent)] == ["no_worker_available"]
        assert 2.5 <= took < 3.5, took
        assert len(checks) == 1, checks  # a check a second: three, the last at 3 s
    finally:
        await dispatch.close()
