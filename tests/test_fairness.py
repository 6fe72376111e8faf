"""Fairness between tenants inside a priority class (the shared queue's per-tenant quantum)."""

from __future__ import annotations

from redis.asyncio import Redis

from shared.jobs import JobStore
from shared.keys import Keys
from shared.models import Job, Priority
from tests.helpers import make_job, running_worker, started_at_ms, wait_state, worker_settings


def tenant_job(tenant: str, max_tokens: int = 8) -> Job:
    job: Job = make_job(max_tokens=max_tokens)
    job.tenant = tenant
    return job


async def test_flooding_tenant_cannot_starve_another(redis: Redis, redis_url: str) -> None:
    store = JobStore(redis, Keys(), ttl_s=600, fair_share_tokens=30)  # three 10-token jobs
    flood = [tenant_job("flooder") for _ in range(40)]
    for job in flood:
        await store.enqueue(job)
    polite = tenant_job("polite")
    await store.enqueue(polite)
    assert await redis.xlen(Keys().queue("sim-model", Priority.NORMAL)) == 4  # 3 + 1
    async with running_worker(worker_settings(redis_url, max_seqs=1, sim_tokens_per_s=400.0)):
        await wait_state(store, polite, {"completed"})
        starts = sorted(
            [
                await started_at_ms(store, j)
                for j in flood
                if (await store.job_state(j.model, j.id)) != "queued"
            ]
        )
        polite_start = await started_at_ms(store, polite)
        ahead = sum(1 for s in starts if s < polite_start)
        assert ahead <= 3, f"{ahead} flooder jobs ran before the polite tenant's"
        for job in flood:
            await wait_state(store, job, {"completed"}, timeout=30)
    assert await redis.hgetall(Keys().model_prefix("sim-model") + "share:normal") == {}


async def test_cancelled_deferred_job_leaves_no_trace(redis: Redis, redis_url: str) -> None:
    store = JobStore(redis, Keys(), ttl_s=600, fair_share_tokens=10)
    first, second = tenant_job("t"), tenant_job("t")
    await store.enqueue(first)
    await store.enqueue(second)  # beyond the quantum: deferred
    deferred = Keys().deferred("sim-model", Priority.NORMAL, "t")
    assert await redis.xlen(deferred) == 1
    assert await store.cancel("sim-model", second.id) == "cancelled"
    assert await redis.xlen(deferred) == 0
    async with running_worker(worker_settings(redis_url)):
        await wait_state(store, first, {"completed"})
    backlog = await redis.hgetall(Keys().backlog("sim-model"))
    assert backlog["normal:tokens"] == "0" and backlog["normal:jobs"] == "0"
