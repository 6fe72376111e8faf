"""The janitor's chores against a real Redis, and its cron firing once per period with two
janitor processes running."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest
from redis.asyncio import Redis

from shared.jobs import JobStore, now_ms
from shared.keys import CONSUMER_GROUP, Keys
from shared.models import Priority, WorkerInfo
from slipstream.janitor import (
    JanitorSettings,
    clean_dead_workers,
    cron_fields,
    json_dumps,
    json_loads,
    oldest_needed_id,
    rollup_stats,
    successor,
    sweep_leases,
    trim_queue,
    trim_streams,
)
from tests.helpers import make_job

KEYS = Keys()


def info(worker_id: str, beat_ms: int, **extra: Any) -> WorkerInfo:
    fields: dict[str, Any] = {
        "id": worker_id,
        "host": "h",
        "pid": 1,
        "model": "sim-model",
        "engine": "sim",
        "capacity_tokens": 100,
        "max_seqs": 4,
        "started_at_ms": beat_ms,
        "heartbeat_at_ms": beat_ms,
        **extra,
    }
    return WorkerInfo(**fields)


async def register(redis: Redis, w: WorkerInfo, *, scored: bool = True) -> None:
    await redis.hset(KEYS.workers, w.id, w.model_dump_json())  # type: ignore[misc]
    if scored:
        await redis.zadd(KEYS.workers_seen, {w.id: w.heartbeat_at_ms})
    await redis.hset(KEYS.throughput(w.model), w.id, str(w.tokens_per_s))  # type: ignore[misc]


async def test_dead_workers_leave_the_registry_and_throughput(redis: Redis) -> None:
    now = now_ms()
    await register(redis, info("live", now, tokens_per_s=10.0))
    await register(redis, info("dead", now - 60_000))
    await register(redis, info("orphan-old", now - 60_000), scored=False)
    await register(redis, info("orphan-new", now), scored=False)  # mid-registration: kept
    dead = await clean_dead_workers(redis, KEYS, now - 50_000)
    assert dead == ["dead", "orphan-old"]
    assert set(await redis.hkeys(KEYS.workers)) == {"live", "orphan-new"}  # type: ignore[misc]
    assert await redis.zrange(KEYS.workers_seen, 0, -1) == ["live"]
    assert set(await redis.hkeys(KEYS.throughput("sim-model"))) == {  # type: ignore[misc]
        "live",
        "orphan-new",
    }
    assert await clean_dead_workers(redis, KEYS, now - 50_000) == []


async def fill(redis: Redis, stream: str, n: int) -> list[str]:
    await redis.xgroup_create(stream, CONSUMER_GROUP, "0", mkstream=True)
    return [await redis.xadd(stream, {"job": str(i)}) for i in range(n)]


async def needed(redis: Redis, stream: str, ids: list[str]) -> set[str]:
    """Entries still pending or not yet delivered: what a trim must keep."""
    groups = await redis.xinfo_groups(stream)
    delivered = groups[0]["last-delivered-id"]
    pending = await redis.xpending_range(stream, CONSUMER_GROUP, "-", "+", 10_000)
    after = {
        i for i in ids if tuple(map(int, i.split("-"))) > tuple(map(int, delivered.split("-")))
    }
    return after | {p["message_id"] for p in pending}


async def test_trim_keeps_pending_and_undelivered_entries(redis: Redis) -> None:
    stream = KEYS.queue("sim-model", Priority.NORMAL)
    ids = await fill(redis, stream, 10)
    await redis.xreadgroup(CONSUMER_GROUP, "c1", {stream: ">"}, count=6)
    await redis.xack(stream, CONSUMER_GROUP, ids[1], ids[2], ids[4], ids[5])
    assert await oldest_needed_id(redis, stream) == ids[0]  # ids[0] is pending
    assert await trim_queue(redis, stream) == 0
    await redis.xack(stream, CONSUMER_GROUP, ids[0])
    assert await trim_queue(redis, stream) == 3  # ids[0..2]; ids[3] is still pending
    left = [e[0] for e in await redis.xrange(stream)]
    assert left == ids[3:]
    await redis.xack(stream, CONSUMER_GROUP, ids[3])
    assert await oldest_needed_id(redis, stream) == successor(ids[5])
    assert await trim_queue(redis, stream) == 3
    assert [e[0] for e in await redis.xrange(stream)] == ids[6:]  # undelivered: all kept
    claimed = await redis.xreadgroup(CONSUMER_GROUP, "c2", {stream: ">"}, count=10)
    assert [e[0] for e in claimed[0][1]] == ids[6:]


async def test_trim_without_a_group_keeps_everything(redis: Redis) -> None:
    stream = KEYS.queue("sim-model", Priority.LOW)
    for i in range(5):
        await redis.xadd(stream, {"job": str(i)})
    assert await oldest_needed_id(redis, stream) is None
    assert await trim_queue(redis, stream) == 0
    assert await redis.xlen(stream) == 5
    assert await trim_queue(redis, "no-such-stream") == 0


async def test_trim_random_histories_never_drop_a_needed_entry(redis: Redis) -> None:
    rng = random.Random(6)
    for trial in range(25):
        stream = f"trial:{trial}"
        ids = await fill(redis, stream, rng.randint(1, 40))
        for _ in range(rng.randint(1, 6)):
            await redis.xreadgroup(
                CONSUMER_GROUP, f"c{rng.randint(1, 3)}", {stream: ">"}, count=rng.randint(1, 8)
            )
            pending = await redis.xpending_range(stream, CONSUMER_GROUP, "-", "+", 1000)
            done = [p["message_id"] for p in pending if rng.random() < 0.6]
            if done:
                await redis.xack(stream, CONSUMER_GROUP, *done)
            keep = await needed(redis, stream, ids)
            await trim_queue(redis, stream)
            left = {e[0] for e in await redis.xrange(stream)}
            assert keep <= left, f"trial {trial}: trimmed needed entries {keep - left}"


async def test_trim_with_real_jobs_then_pull_and_takeover(redis: Redis) -> None:
    store = JobStore(redis, KEYS, ttl_s=60)
    jobs = [make_job() for _ in range(5)]
    for job in jobs:
        await store.enqueue(job)
    aging = {Priority.NORMAL: 0, Priority.LOW: 0}
    pulled = [
        await store.pull(
            "sim-model",
            "w1",
            free_tokens=10_000,
            idle=False,
            lease_ms=50,
            aging_ms=aging,
            max_deliveries=3,
        )
        for _ in range(2)
    ]
    assert all(p.kind == "job" for p in pulled)
    queue = KEYS.queue("sim-model", Priority.NORMAL)
    assert await trim_streams(redis, KEYS, "sim-model", 100) == 0
    assert await redis.xlen(queue) == 5
    await asyncio.sleep(0.1)  # w1's leases expire: w2 takes both over, then pulls the rest
    seen = []
    for _ in range(5):
        result = await store.pull(
            "sim-model",
            "w2",
            free_tokens=10_000,
            idle=False,
            lease_ms=5000,
            aging_ms=aging,
            max_deliveries=3,
        )
        assert result.kind == "job" and result.claimed is not None
        seen.append(result.claimed.job.id)
    assert sorted(seen) == sorted(j.id for j in jobs)


async def test_dead_letter_stream_is_capped(redis: Redis) -> None:
    dead = KEYS.dead_letter("sim-model")
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(3000):
            pipe.xadd(dead, {"job": str(i)})
        await pipe.execute()
    await trim_streams(redis, KEYS, "sim-model", 200)
    assert 200 <= await redis.xlen(dead) < 400  # MAXLEN ~: whole nodes only


async def test_rollup_sums_live_workers(redis: Redis) -> None:
    now = now_ms()
    await register(redis, info("a", now, tokens_per_s=12.5, tokens_in_use=30))
    await register(redis, info("b", now, tokens_per_s=7.5, draining=True))
    await register(redis, info("gone", now - 60_000, tokens_per_s=99.0))
    await rollup_stats(redis, KEYS, {"other-model"}, 5.0, 60_000)
    stats = await redis.hgetall(KEYS.stats("sim-model"))  # type: ignore[misc]
    assert float(stats["tokens_per_s"]) == 20.0
    assert int(stats["workers"]) == 2
    assert int(stats["capacity_tokens"]) == 100  # the draining worker takes no new work
    assert int(stats["tokens_in_use"]) == 30
    assert int((await redis.hgetall(KEYS.stats("other-model")))["workers"]) == 0  # type: ignore[misc]
    assert 0 < await redis.pttl(KEYS.stats("sim-model")) <= 60_000


async def test_sweep_is_optional_until_the_store_has_it(redis: Redis) -> None:
    class Sweeping:
        async def sweep_expired_leases(self, model: str) -> list[str]:
            return ["j1", "j2"]

    store = JobStore(redis, KEYS, ttl_s=60)
    assert await sweep_leases(store, "sim-model") == 0
    assert await sweep_leases(Sweeping(), "sim-model") == 2  # type: ignore[arg-type]


def test_cron_periods_and_json_serializer() -> None:
    assert cron_fields(10) == (set(range(0, 60, 10)), None)
    assert cron_fields(60) == ({0}, set(range(60)))
    assert cron_fields(300) == ({0}, set(range(0, 60, 5)))
    with pytest.raises(ValueError):
        JanitorSettings(janitor_interval_s=7)
    data = json_dumps({"a": (1, 2), "r": RuntimeError("boom")})
    assert json_loads(data) == {"a": [1, 2], "r": "RuntimeError('boom')"}


def spawn_janitor(redis_url: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "SLIPSTREAM_JANITOR_INTERVAL_S": "1",
        "SLIPSTREAM_LOG_LEVEL": "warning",
    }
    return subprocess.Popen([sys.executable, "-m", "slipstream", "janitor"], env=env)


async def wait_for_firing(redis: Redis, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not await redis.xlen(KEYS.janitor_log):
        assert time.monotonic() < end, "no janitor fired"
        await asyncio.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(15)


@pytest.mark.slow
async def test_two_janitors_fire_each_cron_once_per_period(redis: Redis, redis_url: str) -> None:
    """Two janitor processes: every firing runs once; when the one doing the work stops, the
    other carries on without a second run of any firing."""
    await register(redis, info("dead", now_ms() - 3_600_000))
    procs = [spawn_janitor(redis_url), spawn_janitor(redis_url)]
    try:
        await wait_for_firing(redis, 10.0)
        await asyncio.sleep(3.0)
        entries = [f for _, f in await redis.xrange(KEYS.janitor_log)]
        busiest = Counter(f["janitor"] for f in entries).most_common(1)[0][0]
        pid = int(busiest.split("-")[-2])
        first = next(p for p in procs if p.pid == pid)
        assert stop(first) == 0
        stopped_at = now_ms()
        await asyncio.sleep(3.0)
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0, 0]
    entries = [(int(i.split("-")[0]), f) for i, f in await redis.xrange(KEYS.janitor_log)]
    firings = Counter((f["task"], f["job"]) for _, f in entries)
    assert max(firings.values()) == 1, f"a firing ran twice: {firings}"
    tasks = Counter(task for task, _ in firings)
    assert set(tasks) == {"clean_workers", "sweep_leases", "trim_streams", "rollup_stats"}
    assert all(4 <= n <= 10 for n in tasks.values()), tasks  # one per second for ~6-7 s
    after = {f["janitor"] for at, f in entries if at > stopped_at + 100}
    assert after and busiest not in after  # the survivor took over the chores
    assert await redis.hget(KEYS.workers, "dead") is None  # type: ignore[misc]
    for key in await redis.keys("arq:result:cron:*"):
        raw = await redis.get(key)
        assert raw is not None and json.loads(raw)["s"] is True  # JSON, not pickle
    by_janitor = Counter(f["janitor"] for _, f in entries)
    print(f"janitor firings per task: {dict(tasks)}; by janitor: {dict(by_janitor)}")


async def test_sweep_expires_a_stranded_job_past_its_deadline(redis: Redis) -> None:
    """A job whose worker died, with no worker left to take it over, still gets an outcome."""
    from shared.models import Priority
    from tests.helpers import make_job

    store = JobStore(redis, KEYS, ttl_s=60)
    job = make_job(deadline_ms=100)
    await store.enqueue(job)
    claimed = await store.pull(
        "sim-model",
        "gone",
        free_tokens=10_000,
        idle=True,
        lease_ms=1,
        aging_ms={Priority.LOW: 0},
        max_deliveries=3,
    )
    assert claimed.kind == "job"
    await asyncio.sleep(0.2)  # lease and deadline both pass; nobody pulls
    assert await store.sweep_expired_leases("sim-model") == [job.id]
    assert await store.job_state("sim-model", job.id) == "expired"
    assert await redis.zcard(KEYS.leases("sim-model")) == 0


async def _pull_one(store: JobStore) -> str:
    result = await store.pull(
        "sim-model", "w", free_tokens=10_000, idle=True, lease_ms=60_000,
        aging_ms={Priority.LOW: 0}, max_deliveries=3,
    )  # fmt: skip
    return result.kind


async def test_a_pull_judges_the_deadline_enqueue_recorded(redis: Redis) -> None:
    """PULL reads the job hash's ``deadline`` (not its payload, which it would have to decode
    whole): a job whose recorded deadline passed is expired, not handed out."""
    from tests.helpers import make_job

    store = JobStore(redis, KEYS, ttl_s=60)
    job = make_job()  # no deadline in its payload
    await store.enqueue(job)
    assert await redis.hget(KEYS.job("sim-model", job.id), "deadline") == ""
    await redis.hset(KEYS.job("sim-model", job.id), "deadline", now_ms() - 1000)
    assert await _pull_one(store) == "skipped"
    assert await store.job_state("sim-model", job.id) == "expired"


async def test_a_job_queued_without_the_deadline_field_is_judged_by_its_payload(
    redis: Redis,
) -> None:
    """A job an older gateway queued has no ``deadline`` field; its payload still says it."""
    from tests.helpers import make_job

    store = JobStore(redis, KEYS, ttl_s=60)
    late, on_time = make_job(deadline_ms=1), make_job(deadline_ms=60_000)
    for job in (late, on_time):
        await store.enqueue(job)
        await redis.hdel(KEYS.job("sim-model", job.id), "deadline")
    await asyncio.sleep(0.05)
    assert await _pull_one(store) == "skipped"
    assert await store.job_state("sim-model", late.id) == "expired"
    assert await _pull_one(store) == "job"
    assert await store.job_state("sim-model", on_time.id) == "running"
