"""``EmitBatcher``: many jobs' batches share round trips; each still gets its own outcome."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from shared.jobs import Claimed, Emit, JobStore
from shared.keys import Keys
from shared.models import EventBatch, TokenEvent, Usage
from tests.helpers import make_job
from worker.emit_batcher import EmitBatcher
from worker.emitter import EventEmitter


async def claim(store: JobStore, n: int) -> list[Claimed]:
    for _ in range(n):
        await store.enqueue(make_job())
    pull = {"free_tokens": 10**6, "idle": True, "lease_ms": 60_000, "aging_ms": {}}
    claims = []
    for _ in range(n):
        taken = await store.pull("sim-model", "w", max_deliveries=3, **pull)  # type: ignore[arg-type]
        assert taken.claimed is not None
        claims.append(taken.claimed)
    return claims


async def test_concurrent_emits_share_round_trips(redis: Redis) -> None:
    store = JobStore(redis, Keys(), ttl_s=60)
    claims = await claim(store, 40)
    batcher = EmitBatcher(store)
    batch = EventBatch(events=[TokenEvent(s=1, x=" hi")])
    outcomes = await asyncio.gather(*(batcher.emit(c, batch, new_tokens=1) for c in claims))
    assert outcomes == [True] * 40
    assert batcher.round_trips < 40 / 4  # the first goes alone, the rest ride together
    for c in claims:
        entries = await store.read_log(c.job.model, c.job.id)
        assert [e.x for entry in entries for e in entry.batch.events] == [" hi"]  # type: ignore[union-attr]
    await batcher.close()


async def test_a_fenced_job_is_refused_alone(redis: Redis) -> None:
    store = JobStore(redis, Keys(), ttl_s=60)
    ours, cancelled = await claim(store, 2)
    await store.cancel(cancelled.job.model, cancelled.job.id)  # moves its fence
    batcher = EmitBatcher(store)
    batch = EventBatch(events=[TokenEvent(s=1, x="x")])
    results = await asyncio.gather(
        batcher.emit(ours, batch, new_tokens=1), batcher.emit(cancelled, batch, new_tokens=1)
    )
    assert list(results) == [True, False]
    await batcher.close()


async def test_script_unknown_to_redis_is_loaded_once(redis: Redis) -> None:
    store = JobStore(redis, Keys(), ttl_s=60)
    claims = await claim(store, 3)
    await redis.script_flush()
    results = await store.emit_many(
        [_emit(c) for c in claims]  # every call meets NOSCRIPT, then runs once
    )
    assert results == [True, True, True]
    for c in claims:
        assert len(await store.read_log(c.job.model, c.job.id)) == 1


def _emit(claimed: Claimed) -> Emit:
    return Emit(claimed, EventBatch(events=[TokenEvent(s=1, x="y")]), 1)


async def test_the_first_write_goes_out_before_its_waiter_wakes(redis: Redis) -> None:
    """The worker's next pull waits on ``first_write``: the first token's write must be on
    its way (handed to Redis) before that waiter runs, not queued behind it."""
    store = JobStore(redis, Keys(), ttl_s=60)
    (claimed,) = await claim(store, 1)
    order: list[str] = []
    emit_many = store.emit_many

    async def recorded(emits: list[Emit]) -> list[bool | Exception]:
        order.append("write")
        return await emit_many(emits)

    store.emit_many = recorded  # type: ignore[method-assign]
    batcher = EmitBatcher(store)
    first = asyncio.Event()
    emitter = EventEmitter(batcher, claimed, 0.05, first_write=first)

    async def waiter() -> None:
        await first.wait()
        order.append("waiter")

    waiting = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    await emitter.token(" hi")
    await asyncio.wait_for(waiting, 5.0)
    assert order == ["write", "waiter"]
    await emitter.done("stop", Usage(prompt_tokens=1, completion_tokens=1))
    entries = await store.read_log(claimed.job.model, claimed.job.id)
    assert [e.t for entry in entries for e in entry.batch.events] == ["token", "done"]
    await batcher.close()
