"""A worker that takes over its own expired lease keeps tracking the new claim."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.jobs import JobStore
from shared.keys import Keys
from tests.helpers import make_job, worker_settings
from worker.engines.sim import SimEngine, SimProfile
from worker.service import Worker


async def test_own_takeover_keeps_the_new_claim_tracked(redis: Redis, redis_url: str) -> None:
    settings = worker_settings(redis_url)
    worker = Worker(settings, redis, SimEngine(SimProfile(ttft_s=0.0, tokens_per_s=50.0)))
    job = make_job(max_tokens=500)
    await worker.store.enqueue(job)
    pull = {"free_tokens": 10_000, "idle": True, "aging_ms": {}, "max_deliveries": 5}
    first = await worker.store.pull(job.model, worker.id, lease_ms=200, **pull)  # type: ignore[arg-type]
    assert first.claimed is not None
    worker._start(first.claimed)
    old_task = worker.running[job.id][0]
    await asyncio.sleep(0.3)  # no heartbeat renews it: the lease expires
    second = await worker.store.pull(job.model, worker.id, lease_ms=60_000, **pull)  # type: ignore[arg-type]
    assert second.claimed is not None and second.outcome == "takeover"
    assert second.claimed.fence == first.claimed.fence + 1
    worker._start(second.claimed)
    await asyncio.wait_for(old_task, 5)  # fenced off at its next write
    assert job.id in worker.running, "the new claim must stay tracked (renewed, cancellable)"
    assert worker.running[job.id][1].fence == second.claimed.fence
    new_task = worker.running[job.id][0]
    new_task.cancel()
    await asyncio.gather(new_task, return_exceptions=True)
    assert job.id not in worker.running  # its own end still untracks it
    await worker.emits.close()


async def test_ten_thousand_leases_renew(redis: Redis) -> None:
    """One RENEW used to carry every lease: past ~8,000 Lua's ``unpack`` failed, every
    renewal with it, and a worker at 10,000 streams took over its own jobs all the time."""
    keys, n, model = Keys(), 10_000, "sim-model"
    store = JobStore(redis, keys, ttl_s=60)
    fences = {f"job{i}": 3 for i in range(n)}
    async with redis.pipeline(transaction=False) as pipe:
        for job_id, fence in fences.items():
            pipe.hset(keys.job(model, job_id), mapping={"fence": fence, "state": "running"})
        pipe.zadd(keys.leases(model), dict.fromkeys(fences, 1))
        await pipe.execute()
    fences["job0"] = 2  # fenced off: a newer claim holds it
    held = await store.renew(model, fences, 60_000)
    assert held == {job_id: job_id != "job0" for job_id in fences}
    renewed = await redis.zrangebyscore(keys.leases(model), 2, "+inf")
    assert len(renewed) == n - 1 and b"job0" not in renewed


async def test_a_failed_renewal_batch_leaves_the_others_renewed(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys, model = Keys(), "sim-model"
    store = JobStore(redis, keys, ttl_s=60)
    fences = {f"job{i}": 1 for i in range(2_500)}  # three batches
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in fences:
            pipe.hset(keys.job(model, job_id), mapping={"fence": 1, "state": "running"})
        await pipe.execute()
    real, calls = redis.evalsha, [0]

    async def second_fails(*args: object) -> object:
        calls[0] += 1
        if calls[0] == 2:
            raise RedisConnectionError("lost")
        return await real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(redis, "evalsha", second_fails)
    held = await store.renew(model, fences, 60_000)
    assert calls[0] == 3 and len(held) == 1_500 and all(held.values())
    assert "job1000" not in held and "job0" in held and "job2499" in held
    monkeypatch.setattr(redis, "evalsha", lambda *_args: _fail())
    with pytest.raises(RedisConnectionError):
        await store.renew(model, fences, 60_000)  # every batch failed


async def _fail() -> None:
    raise RedisConnectionError("down")


async def test_a_pull_whose_answer_was_lost_gets_its_claim_back(
    redis: Redis, redis_url: str
) -> None:
    """The PULL script ran and claimed a job, but its answer never came back (Redis failing
    over, past the client's retries): the worker's next pull repeats the lost one's id and
    runs that job now, not after its lease (60 s here) runs out. A fresh id instead (the
    behaviour before) leaves the job claimed and silent: this test then times out."""
    settings = worker_settings(redis_url, lease_s=60.0)
    worker = Worker(settings, redis, SimEngine(SimProfile(ttft_s=0.0, tokens_per_s=500.0)))
    real_pull, ids, lost = worker.store.pull, [], []

    async def pull_losing_the_first_answer(*args: Any, **kwargs: Any) -> Any:
        ids.append(kwargs.get("pull_id"))
        result = await real_pull(*args, **kwargs)
        if not lost and result.claimed is not None:
            lost.append(result.claimed.job.id)
            raise RedisConnectionError("the answer was lost")
        return result

    worker.store.pull = pull_losing_the_first_answer  # type: ignore[method-assign]
    job = make_job(max_tokens=4)
    await worker.store.enqueue(job)
    running = asyncio.create_task(worker.run())
    try:
        for _ in range(100):
            if await worker.store.job_state(job.model, job.id) == "completed":
                break
            await asyncio.sleep(0.05)
        assert lost == [job.id], "the first claim's answer was lost"
        assert await worker.store.job_state(job.model, job.id) == "completed"
        assert ids[0] == ids[1], "the pull after the lost answer repeats its id"
        assert len(set(ids[1:])) == len(ids) - 1, "once answered, each pull is a new one"
    finally:
        worker.stop()
        await asyncio.wait_for(running, 10)
