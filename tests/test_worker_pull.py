"""The worker's pull loop against real Redis: priority, aging, capacity, speed."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from shared.jobs import JobStore
from shared.keys import Keys
from shared.models import Job, WorkerInfo
from tests.helpers import make_job, running_worker, started_at_ms, wait_state, worker_settings

DONE = {"completed"}


def store_for(redis: Redis) -> JobStore:
    return JobStore(redis, Keys(), ttl_s=600)


async def states(store: JobStore, jobs: list[Job]) -> list[str]:
    return [(await store.state(j.model, j.id)).get("state", "") for j in jobs]


async def test_priority_order_high_normal_low(redis: Redis, redis_url: str) -> None:
    store = store_for(redis)
    settings = worker_settings(redis_url, max_seqs=1, sim_tokens_per_s=200.0)
    async with running_worker(settings):
        blocker = make_job(max_tokens=30)
        await store.enqueue(blocker)
        await wait_state(store, blocker, {"running"})
        low, normal, high = (make_job(priority=p) for p in ("low", "normal", "high"))
        for job in (low, normal, high):
            await store.enqueue(job)
        for job in (low, normal, high):
            await wait_state(store, job, DONE)
        starts = [await started_at_ms(store, j) for j in (high, normal, low)]
        assert starts == sorted(starts)


async def test_aging_serves_low_within_bound(redis: Redis, redis_url: str) -> None:
    store = store_for(redis)
    settings = worker_settings(redis_url, max_seqs=1, sim_tokens_per_s=200.0, aging_low_s=0.3)
    async with running_worker(settings):
        low = make_job(priority="low", max_tokens=4)
        highs = [make_job(priority="high", max_tokens=10) for _ in range(40)]
        await store.enqueue(highs[0])
        await store.enqueue(low)
        for job in highs[1:]:
            await store.enqueue(job)
        await wait_state(store, low, DONE, timeout=20)
        low_start = await started_at_ms(store, low)
        assert low_start - low.enqueued_at_ms < 300 + 200  # bound + one job's duration
        assert "queued" in await states(store, highs), "low must overtake queued high jobs"


async def test_capacity_never_exceeded(redis: Redis, redis_url: str) -> None:
    store = store_for(redis)
    settings = worker_settings(redis_url, capacity_tokens=100, max_seqs=8, heartbeat_s=0.05)
    async with running_worker(settings) as worker:
        jobs = [make_job(max_tokens=30) for _ in range(15)]  # cost 32 each: three fit
        for job in jobs:
            await store.enqueue(job)
        peak_local = peak_registry = 0
        while set(await states(store, jobs)) != {"completed"}:
            peak_local = max(peak_local, worker.capacity.tokens_in_use)
            info = await redis.hget(worker.keys.workers, worker.id)
            assert info is not None
            peak_registry = max(peak_registry, WorkerInfo.model_validate_json(info).tokens_in_use)
            await asyncio.sleep(0.005)
        assert peak_local == 96 and 0 < peak_registry <= 100


async def test_full_worker_takes_nothing(redis: Redis, redis_url: str) -> None:
    store = store_for(redis)
    settings = worker_settings(redis_url, capacity_tokens=50, sim_tokens_per_s=100.0)
    async with running_worker(settings):
        big = make_job(max_tokens=40)
        second = make_job(max_tokens=40)
        await store.enqueue(big)
        await wait_state(store, big, {"running"})
        await store.enqueue(second)
        await asyncio.sleep(0.15)
        assert (await store.state(second.model, second.id))["state"] == "queued"
        groups = await redis.xinfo_groups(Keys().queue("sim-model", second.priority))
        assert groups[0]["lag"] == 1 and groups[0]["pending"] == 1
        await wait_state(store, second, DONE)


async def test_oversized_job_runs_alone_when_idle(redis: Redis, redis_url: str) -> None:
    store = store_for(redis)
    async with running_worker(worker_settings(redis_url, capacity_tokens=10)):
        job = make_job(max_tokens=20)
        await store.enqueue(job)
        await wait_state(store, job, DONE)


async def test_faster_worker_takes_proportionally_more(redis: Redis, redis_url: str) -> None:
    store = store_for(redis)
    fast = worker_settings(redis_url, max_seqs=2, sim_tokens_per_s=400.0, worker_id="fast")
    slow = worker_settings(redis_url, max_seqs=2, sim_tokens_per_s=80.0, worker_id="slow")
    async with running_worker(fast), running_worker(slow):
        jobs = [make_job(max_tokens=16) for _ in range(40)]
        for job in jobs:
            await store.enqueue(job)
        for job in jobs:
            await wait_state(store, job, DONE, timeout=30)
        owners = [(await store.state(j.model, j.id))["owner"] for j in jobs]
    assert owners.count("fast") >= 2 * owners.count("slow") > 0  # 5x faster; 2 cores, noisy


async def test_idle_worker_picks_up_within_milliseconds(redis: Redis, redis_url: str) -> None:
    store = store_for(redis)
    async with running_worker(worker_settings(redis_url, sim_ttft_ms=0.0)):
        await asyncio.sleep(0.3)  # the worker is now blocked in XREAD
        job = make_job(max_tokens=1)
        t0 = time.time()
        await store.enqueue(job)
        await wait_state(store, job, {"running", "completed"})
        assert await started_at_ms(store, job) - t0 * 1000 < 100


async def test_backlog_counts_only_queued_jobs(redis: Redis, redis_url: str) -> None:
    from shared.jobs import read_backlog
    from shared.models import Priority

    store = store_for(redis)
    jobs = [make_job(max_tokens=10, priority="high") for _ in range(3)]
    for job in jobs:
        await store.enqueue(job)
    assert (await read_backlog(redis, Keys(), "sim-model"))[Priority.HIGH] == (36, 3)
    await store.cancel("sim-model", jobs[0].id)
    assert (await read_backlog(redis, Keys(), "sim-model"))[Priority.HIGH] == (24, 2)
    async with running_worker(worker_settings(redis_url)):
        for job in jobs[1:]:
            await wait_state(store, job, DONE)
    assert (await read_backlog(redis, Keys(), "sim-model"))[Priority.HIGH] == (0, 0)


async def test_pull_says_when_nothing_else_is_waiting(redis: Redis) -> None:
    """A claim that empties the queues carries what to block on; with more queued it does not."""
    store = store_for(redis)
    first, second = make_job(), make_job(priority="high")
    await store.enqueue(first)
    await store.enqueue(second)
    pull = {"free_tokens": 10_000, "idle": True, "lease_ms": 60_000, "aging_ms": {}}
    taken = await store.pull("sim-model", "w", max_deliveries=3, **pull)  # type: ignore[arg-type]
    assert taken.claimed is not None and taken.claimed.job.id == second.id
    assert taken.last_ids == ()  # the normal job still waits: pull again
    taken = await store.pull("sim-model", "w", max_deliveries=3, **pull)  # type: ignore[arg-type]
    assert taken.claimed is not None and taken.claimed.job.id == first.id
    assert len(taken.last_ids) == 4  # three queues and the wake stream
    assert taken.next_lease_ms > 50_000  # both leases run for a minute


async def test_marks_wake_on_what_comes_next_only(redis: Redis) -> None:
    """The marks an empty pull returns: an XREAD from them sees nothing already queued or
    delivered (no busy loop), and sees the next job, also after the streams' newest entries
    were deleted (a mark is then older than the stream's last generated id)."""
    store, keys = store_for(redis), Keys()
    pull = {"free_tokens": 10_000, "idle": True, "lease_ms": 60_000, "aging_ms": {}}
    for _ in range(3):
        await store.enqueue(make_job())
    for _ in range(3):
        await store.pull("sim-model", "w", max_deliveries=3, **pull)  # type: ignore[arg-type]
    names = [*keys.queues("sim-model"), keys.wake("sim-model")]  # highest priority first
    normal = names[1]
    newest = (await redis.xrevrange(normal, count=1))[0][0]
    await redis.xdel(normal, newest)  # the newest entry gone: last-generated-id is ahead
    empty = await store.pull("sim-model", "w", max_deliveries=3, **pull)  # type: ignore[arg-type]
    assert empty.kind == "empty" and len(empty.last_ids) == 4
    streams = dict(zip(names, empty.last_ids, strict=True))
    assert await redis.xread(streams, block=50) == []  # nothing new: it blocks
    job = make_job()
    await store.enqueue(job)
    woke = await redis.xread(streams, block=1000)
    assert [name for name, _ in woke] == [normal]
    assert [entry["job"] for _, entry in woke[0][1]] == [job.id]


async def test_short_job_is_written_in_two_batches(redis: Redis, redis_url: str) -> None:
    """``started`` rides with the first token and the end with the last tokens: a job that
    generates within the coalescing interval costs two writes, not one per event kind."""
    store = store_for(redis)
    settings = worker_settings(
        redis_url, sim_ttft_ms=0.0, sim_tokens_per_s=100_000.0, coalesce_ms=300.0
    )
    async with running_worker(settings):
        job = make_job(max_tokens=8)
        await store.enqueue(job)
        await wait_state(store, job, DONE)
    entries = await store.read_log(job.model, job.id)
    kinds = [[e.t for e in entry.batch.events] for entry in entries]
    assert len(entries) == 2, kinds
    assert kinds[0][:2] == ["started", "token"]
    assert kinds[-1][-1] == "done" and kinds[-1].count("token") >= 1
    assert sum(k.count("token") for k in kinds) == 8


async def test_an_idle_worker_gets_a_job_from_the_pull_queued_behind_its_read(
    redis: Redis, redis_url: str
) -> None:
    """While an idle worker waits, its next PULL waits behind the blocking read on the same
    connection: a job queued then reaches it without a pull of its own."""
    store = store_for(redis)
    async with running_worker(worker_settings(redis_url, sim_ttft_ms=0.0)) as worker:
        await asyncio.sleep(0.3)  # blocked in XREAD, a PULL queued behind it
        plain_pulls: list[object] = []
        pull = worker.store.pull

        async def counted(*args: object, **kwargs: object) -> object:
            plain_pulls.append(args)
            return await pull(*args, **kwargs)  # type: ignore[arg-type]

        worker.store.pull = counted  # type: ignore[method-assign]
        jobs = [make_job(max_tokens=1) for _ in range(3)]
        for job in jobs:  # one at a time: the worker is idle and waiting each time
            await store.enqueue(job)
            await wait_state(store, job, DONE)
            await asyncio.sleep(0.05)
        assert plain_pulls == []


async def test_a_stopping_worker_hands_back_what_its_last_pull_claimed(
    redis: Redis, redis_url: str
) -> None:
    """The answer to the PULL queued behind a read that the stop cancelled never comes; if
    Redis ran it, the job it claimed goes back at once instead of waiting out its lease."""
    from shared.redis import connect
    from worker.engines import build_engine
    from worker.service import Worker

    store = store_for(redis)
    settings = worker_settings(redis_url)
    client = connect(settings.redis_url)
    try:
        worker = Worker(settings, client, build_engine(settings))
        claimed, never_ran = make_job(), make_job()
        await store.enqueue(claimed)
        answer_lost = await store.pull(
            "sim-model", worker.id, **{**worker._pull_args(), "pull_id": "lost"}
        )
        assert answer_lost.claimed is not None and answer_lost.claimed.job.id == claimed.id
        await store.enqueue(never_ran)
        worker._pull_id = "lost"
        await worker._settle_last_pull()
        state = await store.state("sim-model", claimed.id)
        assert state["lease_until"] == "0" and state["handback"] == "1"  # up for takeover
        assert (await store.state("sim-model", never_ran.id))["state"] == "queued"  # untouched

        worker._pull_id = "never-ran"  # a PULL Redis never ran: nothing is claimed now
        await worker._settle_last_pull()
        assert (await store.state("sim-model", never_ran.id))["state"] == "queued"

        answered = await store.pull("sim-model", worker.id, **worker._pull_args())
        assert answered.claimed is not None  # the job handed back, taken over
        worker._answered = answered  # answered, but the stop came before it was started
        await worker._settle_last_pull()
        state = await store.state("sim-model", answered.claimed.job.id)
        assert state["handback"] == str(answered.claimed.fence) == "2"
    finally:
        await client.aclose()


async def test_a_full_answer_to_the_queued_pull_is_asked_again_with_todays_capacity(
    redis: Redis, redis_url: str
) -> None:
    """The queued PULL declares the capacity the wait began with; a job that ended since
    freed more. A ``full`` answer is asked again at once instead of sleeping a second."""
    store = store_for(redis)
    settings = worker_settings(redis_url, capacity_tokens=100, max_seqs=8, sim_tokens_per_s=200.0)
    async with running_worker(settings):
        first = make_job(max_tokens=60)  # ~0.3 s; the wait after it declares ~40 tokens free
        await store.enqueue(first)
        await wait_state(store, first, DONE)
        await asyncio.sleep(0.1)
        second = make_job(max_tokens=60)  # does not fit the ~40, fits the 100 free now
        await store.enqueue(second)
        await wait_state(store, second, {"running", "completed"})
        assert await started_at_ms(store, second) - second.enqueued_at_ms < 500


async def test_a_job_the_queued_pull_claimed_for_an_engine_gone_unhealthy_is_handed_back(
    redis: Redis, redis_url: str
) -> None:
    store = store_for(redis)
    async with running_worker(worker_settings(redis_url, heartbeat_s=0.05)) as worker:
        await asyncio.sleep(0.3)  # blocked in XREAD, a PULL queued behind it
        worker.engine.healthy = lambda: False  # type: ignore[method-assign]
        job = make_job(max_tokens=2)
        await store.enqueue(job)
        for _ in range(200):
            if (await store.state(job.model, job.id)).get("handback") == "1":
                break
            await asyncio.sleep(0.01)
        assert (await store.state(job.model, job.id)).get("handback") == "1"
        del worker.engine.healthy  # healthy again: it is taken over and served, not lost
        await wait_state(store, job, DONE, timeout=10)
