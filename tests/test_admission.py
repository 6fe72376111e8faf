"""Deadline-aware admission, queue limits, context length and queue-position progress.

Most tests plant a worker registry entry with known figures (no worker process), so the
estimate is exact: ``ahead / rate + max_tokens / seq_speed`` against the deadline.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import httpx
import openai
import pytest
from redis.asyncio import Redis

from gateway.admission import Admission, Fleet, summarize
from gateway.backlog_cache import BacklogCache
from gateway.dispatch import Dispatch
from shared.jobs import JobStore, now_ms
from shared.keys import CONSUMER_GROUP, Keys
from shared.models import Event, Priority, WorkerInfo
from tests.helpers import (
    gateway_settings,
    make_job,
    running_gateway,
    running_worker,
    worker_settings,
)

MSG = [{"role": "user", "content": "hi"}]


async def plant_worker(redis: Redis, model: str = "sim-model", **figures: Any) -> WorkerInfo:
    """A registry entry as a live worker's heartbeat would write it."""
    now = now_ms()
    info = WorkerInfo(
        id=f"planted-{os.urandom(3).hex()}",
        host="test",
        pid=1,
        model=model,
        engine="sim",
        capacity_tokens=8192,
        max_seqs=figures.pop("max_seqs", 4),
        started_at_ms=now,
        heartbeat_at_ms=now,
        **figures,
    )
    keys = Keys()
    await redis.hset(keys.workers, info.id, info.model_dump_json())  # type: ignore[misc]
    await redis.zadd(keys.workers_seen, {info.id: now + 60_000})  # stays live for the test
    await redis.sadd(keys.models, model)  # type: ignore[misc]
    return info


async def queue_tokens(redis: Redis, tokens: int, priority: str = "normal", n: int = 1) -> None:
    """Queue ``n`` jobs of ``tokens`` tokens each (cost = 2-token prompt + max_tokens)."""
    store = JobStore(redis, Keys(), ttl_s=60)
    for _ in range(n):
        await store.enqueue(make_job(max_tokens=tokens - 2, priority=priority))


async def queued(redis: Redis) -> int:
    return sum([await redis.xlen(Keys().queue("sim-model", p)) for p in Priority.ordered()])


def chat(deadline_ms: int | None = None, max_tokens: int = 10, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "sim-model", "messages": MSG, "max_tokens": max_tokens}
    if deadline_ms is not None:
        body["deadline_ms"] = deadline_ms
    return {**body, **extra}


async def test_deadline_that_cannot_be_met_is_429_with_computed_retry_after(
    redis: Redis, redis_url: str
) -> None:
    await plant_worker(redis, tokens_per_s=100.0, seq_tokens_per_s=50.0, max_seqs=1)
    await queue_tokens(redis, 500, n=2)  # 1000 tokens ahead at 100 tokens/s: 10 s
    before = await queued(redis)
    exact = gateway_settings(redis_url, admission_backlog_max_age_s=0)  # sees each enqueue
    async with running_gateway(exact) as base, httpx.AsyncClient() as c:
        t0 = time.perf_counter()
        response = await c.post(f"{base}/v1/chat/completions", json=chat(2000))
        elapsed = time.perf_counter() - t0
        assert response.status_code == 429
        error = response.json()["error"]
        assert error["code"] == "deadline_unattainable" and error["type"] == "rate_limit_error"
        # 10 s of queue + 0.2 s own - 2 s budget = 8.2 s: rounded up, 9
        assert response.headers["retry-after"] == "9"
        assert elapsed < 0.5
        assert await queued(redis) == before  # nothing enqueued
        await queue_tokens(redis, 500, n=2)  # twice the queue: a later Retry-After
        again = await c.post(f"{base}/v1/chat/completions", json=chat(2000))
        assert again.status_code == 429 and again.headers["retry-after"] == "19"


async def test_backlog_snapshot_counts_own_admissions_at_once(redis: Redis) -> None:
    """Other gateways' jobs show up within ``max_age_s``; this gateway's own at once."""
    cache = BacklogCache(redis, Keys(), max_age_s=0.3)
    assert (await cache.get("sim-model"))[Priority.NORMAL] == (0, 0)
    await queue_tokens(redis, 40)  # another gateway's job
    assert (await cache.get("sim-model"))[Priority.NORMAL] == (0, 0)  # the snapshot is fresh
    cache.add("sim-model", Priority.NORMAL, 25)
    assert (await cache.get("sim-model"))[Priority.NORMAL] == (25, 1)
    await asyncio.sleep(0.35)
    reads = await asyncio.gather(*(cache.get("sim-model") for _ in range(5)))
    assert all(r[Priority.NORMAL] == (40, 1) for r in reads)  # stale: read again


async def test_higher_priority_does_not_wait_behind_lower(redis: Redis, redis_url: str) -> None:
    await plant_worker(redis, tokens_per_s=100.0, seq_tokens_per_s=50.0, max_seqs=1)
    await queue_tokens(redis, 500, priority="normal", n=2)
    async with running_gateway(gateway_settings(redis_url)) as base, httpx.AsyncClient() as c:
        low = await c.post(f"{base}/v1/jobs", json=chat(2000, priority="low"))
        high = await c.post(f"{base}/v1/jobs", json=chat(2000, priority="high"))
        normal = await c.post(f"{base}/v1/jobs", json=chat(60_000, priority="normal"))
    assert low.status_code == 429
    assert high.status_code == 202  # nothing queued at high: it starts next
    assert normal.status_code == 202  # a deadline the queue can meet


async def test_deadline_shorter_than_the_job_itself_is_400(redis: Redis, redis_url: str) -> None:
    await plant_worker(redis, tokens_per_s=100.0, seq_tokens_per_s=50.0, max_seqs=1)
    async with running_gateway(gateway_settings(redis_url)) as base, httpx.AsyncClient() as c:
        response = await c.post(f"{base}/v1/chat/completions", json=chat(500, max_tokens=100))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "deadline_too_short"
    assert await queued(redis) == 0


async def test_unknown_throughput_admits(redis: Redis, redis_url: str) -> None:
    await plant_worker(redis)  # nothing measured yet: no rate, no sequence speed
    await queue_tokens(redis, 500, n=4)
    async with running_gateway(gateway_settings(redis_url)) as base, httpx.AsyncClient() as c:
        response = await c.post(f"{base}/v1/jobs", json=chat(1000))
    assert response.status_code == 202


async def test_young_fleet_measuring_its_first_load_admits(redis: Redis, redis_url: str) -> None:
    """Before any sequence finished, a worker's measured rate is its load so far (a few
    tokens/s in its first seconds), not its capacity: no deadline refusal on it."""
    await plant_worker(redis, tokens_per_s=5.0, drain_tokens_per_s=5.0)  # no sequence speed
    await queue_tokens(redis, 1000, n=3)  # 600 s at 5 tokens/s
    async with running_gateway(gateway_settings(redis_url)) as base, httpx.AsyncClient() as c:
        response = await c.post(f"{base}/v1/jobs", json=chat(deadline_ms=60_000))
    assert response.status_code == 202, response.text


async def test_queue_limits_keep_room_for_higher_priorities(redis: Redis, redis_url: str) -> None:
    await plant_worker(redis, tokens_per_s=100.0)
    gw = gateway_settings(redis_url, max_queue_jobs=10, queue_reserve=0.1)
    await queue_tokens(redis, 10, priority="low", n=8)  # low may fill 80%: full for low
    async with running_gateway(gw) as base, httpx.AsyncClient() as c:
        low = await c.post(f"{base}/v1/jobs", json=chat(priority="low"))
        assert low.status_code == 429 and low.json()["error"]["code"] == "queue_full"
        assert int(low.headers["retry-after"]) >= 1
        normal = await c.post(f"{base}/v1/jobs", json=chat(priority="normal"))
        assert normal.status_code == 202  # 9 of 10: normal's 90%
        assert (await c.post(f"{base}/v1/jobs", json=chat(priority="normal"))).status_code == 429
        assert (await c.post(f"{base}/v1/jobs", json=chat(priority="high"))).status_code == 202
        assert (await c.post(f"{base}/v1/jobs", json=chat(priority="high"))).status_code == 429
    assert await queued(redis) == 10


async def test_per_model_token_limit(redis: Redis, redis_url: str) -> None:
    await plant_worker(redis, tokens_per_s=100.0)
    gw = gateway_settings(redis_url, queue_limits={"sim-model": {"tokens": 300}})
    await queue_tokens(redis, 100, priority="high", n=2)
    async with running_gateway(gw) as base, httpx.AsyncClient() as c:
        small = await c.post(f"{base}/v1/jobs", json=chat(priority="high", max_tokens=50))
        big = await c.post(f"{base}/v1/jobs", json=chat(priority="high", max_tokens=200))
    assert small.status_code == 202
    assert big.status_code == 429 and big.json()["error"]["code"] == "queue_full"
    # about 160 tokens over the limit at 100 tokens/s
    assert big.headers["retry-after"] == "2"


async def test_prompt_longer_than_the_context_is_400(redis: Redis, redis_url: str) -> None:
    await plant_worker(redis, context_tokens=64)
    long = [{"role": "user", "content": "word " * 100}]
    async with running_gateway(gateway_settings(redis_url)) as base, httpx.AsyncClient() as c:
        response = await c.post(f"{base}/v1/chat/completions", json=chat(messages=long))
        short = await c.post(f"{base}/v1/jobs", json=chat())
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert short.status_code == 202
    assert await queued(redis) == 1


async def test_workers_publish_speed_and_context(redis: Redis, redis_url: str) -> None:
    settings = worker_settings(redis_url, context_tokens=512, sim_tokens_per_s=200.0)
    async with running_gateway(gateway_settings(redis_url)) as base, running_worker(settings) as w:
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            for _ in range(3):
                assert (await c.post("/v1/chat/completions", json=chat())).status_code == 200
        await w.heartbeat_once()
        info = WorkerInfo.model_validate_json(await redis.hget(Keys().workers, w.id))  # type: ignore[misc]
    assert info.context_tokens == 512
    assert 50 < info.seq_tokens_per_s < 250
    assert info.tokens_per_s > 0


async def test_workers_publish_the_backlog_drained_in_its_unit(
    redis: Redis, redis_url: str
) -> None:
    """Long prompts, short answers. The backlog counts a job as prompt estimate + max_tokens,
    so the rate admission divides it by must count the same: generated tokens/s alone made a
    queue of long prompts look tens of times slower than it is (429 deadline_unattainable for
    work that would finish in time; seen with the warm-state conversations)."""
    settings = worker_settings(redis_url, sim_tokens_per_s=200.0)
    long = [{"role": "user", "content": "Tell me about the northern coast. " * 100}]
    async with running_gateway(gateway_settings(redis_url)) as base, running_worker(settings) as w:
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            for _ in range(3):
                body = chat(max_tokens=8, messages=long)
                assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
        await w.heartbeat_once()
        info = WorkerInfo.model_validate_json(await redis.hget(Keys().workers, w.id))  # type: ignore[misc]
    assert info.tokens_per_s > 0
    assert info.drain_tokens_per_s > 20 * info.tokens_per_s  # ~700-token prompts, 8 tokens each


def test_fleet_rate_is_the_drain_rate_when_reported() -> None:
    base: dict[str, Any] = {"host": "h", "pid": 1, "model": "m", "engine": "sim"}
    base |= {"capacity_tokens": 100, "started_at_ms": 0, "heartbeat_at_ms": 0, "max_seqs": 1}
    new = WorkerInfo(id="a", tokens_per_s=50, drain_tokens_per_s=900, **base)
    old = WorkerInfo(id="b", tokens_per_s=50, **base)  # an older worker: no drain rate
    assert summarize([new, old], {})["m"].rate == 950.0


def test_old_worker_entries_still_parse() -> None:
    old = (
        '{"v":1,"id":"w","host":"h","pid":1,"model":"m","engine":"sim","capacity_tokens":8,'
        '"max_seqs":1,"started_at_ms":0,"heartbeat_at_ms":0}'
    )
    info = WorkerInfo.model_validate_json(old)
    assert info.seq_tokens_per_s == 0.0 and info.context_tokens == 0


def test_fleet_summary_rules() -> None:
    base: dict[str, Any] = {"host": "h", "pid": 1, "model": "m", "engine": "sim"}
    base |= {"capacity_tokens": 100, "started_at_ms": 0, "heartbeat_at_ms": 0}
    a = WorkerInfo(id="a", max_seqs=2, tokens_per_s=50, seq_tokens_per_s=30, **base)
    b = WorkerInfo(id="b", max_seqs=6, tokens_per_s=0, seq_tokens_per_s=10, **base)
    gone = WorkerInfo(id="c", max_seqs=6, tokens_per_s=999, draining=True, **base)
    fleet = summarize([a, b, gone], {"a": 80.0})
    # a: its best (80) over 2 x 30; b: nothing measured, 6 sequences x 10 tokens/s
    assert fleet["m"] == Fleet(workers=2, rate=140.0, seq_speed=15.0, seqs=8, context_tokens=0)
    assert Fleet(seq_speed=10, seqs=4).drain_rate == 40  # nothing measured: capacity


async def test_remembered_rate_decays(redis: Redis, redis_url: str) -> None:
    admission = Admission(redis, Keys(), gateway_settings(redis_url, throughput_memory_s=1.0))
    info = await plant_worker(redis, tokens_per_s=100.0)
    await admission.refresh()
    assert admission.fleet("sim-model").rate == 100.0
    quiet = info.model_copy(update={"tokens_per_s": 10.0})
    await redis.hset(Keys().workers, info.id, quiet.model_dump_json())  # type: ignore[misc]
    await admission.refresh()
    assert admission.fleet("sim-model").rate > 90  # the best it did, not its idle rate
    await asyncio.sleep(1.0)
    await admission.refresh()
    assert 40 < admission.fleet("sim-model").rate < 60  # one half-life later


async def test_queued_stream_gets_position_comments(redis: Redis, redis_url: str) -> None:
    await plant_worker(redis, tokens_per_s=100.0)
    await queue_tokens(redis, 50, priority="high")
    await queue_tokens(redis, 50, priority="normal", n=2)
    gw = gateway_settings(redis_url, stream_start_s=0.05, progress_s=0.1)
    body = chat(stream=True)
    comments: list[str] = []
    async with (
        running_gateway(gw) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith(": queued"):
                comments.append(line)
            if len(comments) == 3:
                break
    assert comments[0] == ": queued position=3 eta_ms=1500"  # 150 tokens at 100/s
    assert len(set(comments)) == 1


async def test_a_queued_stream_wakes_for_its_notes_only(
    redis: Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The notes come at 1, 2, 4... progress periods up to the ping period; the stream's task
    wakes for those, not every progress period in between."""
    await plant_worker(redis, tokens_per_s=100.0)
    await queue_tokens(redis, 50, priority="high")
    waits: list[float] = []
    wait_next = Dispatch.next

    async def counted(self: Dispatch, timeout: float = 1.0, *, slide: float = 0.0) -> list[Event]:
        waits.append(timeout)
        return await wait_next(self, timeout, slide=slide)

    monkeypatch.setattr(Dispatch, "next", counted)
    gw = gateway_settings(redis_url, stream_start_s=0.05, progress_s=0.1, sse_ping_s=2.0)
    comments: list[str] = []
    async with (
        running_gateway(gw) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as c,
        c.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith(": queued"):
                comments.append(line)
            if len(comments) == 5:  # at ~0, 0.1, 0.3, 0.7 and 1.5 s
                break
    assert len(waits) <= len(comments) + 2, waits  # a wait every 0.1 s: ~15


async def test_job_position_for_the_job_api(redis: Redis, redis_url: str) -> None:
    admission = Admission(redis, Keys(), gateway_settings(redis_url))
    await plant_worker(redis, tokens_per_s=200.0)
    await admission.refresh()
    store = JobStore(redis, Keys(), ttl_s=60)
    jobs = [make_job(max_tokens=98, priority=p) for p in ("normal", "high", "normal", "low")]
    for job in jobs:
        await store.enqueue(job)
    assert await admission.position(jobs[1].ref()) == (0, 0)
    assert await admission.position(jobs[0].ref()) == (1, 500)
    assert await admission.position(jobs[2].ref()) == (2, 1000)
    assert await admission.position(jobs[3].ref()) == (3, 1500)
    await store.cancel("sim-model", jobs[0].id)
    assert await admission.position(jobs[2].ref()) == (1, 500)
    assert await admission.position(jobs[0].ref()) is None  # not queued any more


async def test_a_job_reserved_for_its_warm_worker_is_next_in_line(
    redis: Redis, redis_url: str
) -> None:
    """``PULL`` reads a job it reserves for a warm worker out of the queue (the group's last
    delivered id passes it) while the job stays queued: it is next, not off the queue."""
    admission = Admission(redis, Keys(), gateway_settings(redis_url))
    await plant_worker(redis, tokens_per_s=200.0)
    await admission.refresh()
    store = JobStore(redis, Keys(), ttl_s=60)
    job = make_job(max_tokens=98)
    await store.enqueue(job)
    keys = Keys()
    await redis.xreadgroup(CONSUMER_GROUP, "w1", {keys.queue(job.model, job.priority): ">"})
    assert await admission.position(job.ref()) is None  # delivered and not reserved: not queued
    await redis.hset(keys.job(job.model, job.id), "rsv", "w1")  # type: ignore[misc]
    assert await admission.position(job.ref()) == (0, 0)


async def test_openai_sdk_ignores_progress_comments(redis_url: str) -> None:
    settings = worker_settings(redis_url, max_seqs=1, sim_tokens_per_s=40.0)
    gw = gateway_settings(redis_url, stream_start_s=0.05, progress_s=0.05)
    async with running_gateway(gw) as base, running_worker(settings):
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused")
        blocker = asyncio.create_task(
            client.chat.completions.create(model="sim-model", messages=MSG, max_tokens=20)  # type: ignore[arg-type]
        )
        await asyncio.sleep(0.1)
        stream = await client.chat.completions.create(
            model="sim-model",
            messages=MSG,  # type: ignore[arg-type]
            max_tokens=5,
            stream=True,
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await blocker
        await client.close()
    assert len("".join(parts).split()) == 5
