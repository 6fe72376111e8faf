"""Every state-changing script is safe to repeat (issue 12).

redis-py retries a command or a pipeline after a connection error (``shared/redis.py``), also
when the script already ran and only its reply was lost. Each test runs one scenario twice
against the same redis-server, through ``LossyProxy``: once untouched, once with the replies
of chosen script calls lost (Redis runs the call, the connection is cut before the reply, the
client's own retry policy replays it). What the client got back and everything Redis holds
(jobs, queues and their consumer groups, backlog, tenant shares, logs, leases, the wake stream,
the worker hash) must be the same in both runs, apart from times and stream ids.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from shared import scripts
from shared.jobs import Claimed, Emit, JobStore
from shared.keys import Keys
from shared.models import (
    DoneEvent,
    EventBatch,
    Job,
    JobState,
    Priority,
    StartedEvent,
    TokenEvent,
    Usage,
)
from shared.redis import connect
from tests.helpers import RedisProcess, make_job
from tests.lossy_proxy import LossyProxy
from worker.emit_batcher import EmitBatcher
from worker.emitter import EventEmitter

MODEL = "sim-model"
# Fields that hold times or stream ids (they differ between any two runs), or a random id.
VOLATILE = {"lease_until", "entry", "rsv_at", "rsv_until", "aff_picked", "pull_id"}
PULL_ARGS: dict[str, Any] = {
    "free_tokens": 1000,
    "idle": False,
    "aging_ms": {},
    "max_deliveries": 3,
}

Scenario = Callable[["Run"], Awaitable[list[Any]]]


class Run:
    """One run of a scenario: a store whose connection goes through the proxy; ``lose``
    decides whether the chosen calls' replies are lost."""

    def __init__(self, store: JobStore, proxy: LossyProxy, lose: bool) -> None:
        self.store, self.proxy, self.lose = store, proxy, lose
        self.armed = 0

    def lose_reply(self, script: str) -> None:
        """Lose the reply to the next call of ``script`` (only in the faulty run)."""
        if self.lose:
            self.proxy.arm(_sha(self.store, script).encode())
            self.armed += 1

    async def pull(self, consumer: str = "w1", **overrides: Any) -> Claimed | str:
        result = await self.store.pull(
            MODEL, consumer, **{"lease_ms": 60_000, **PULL_ARGS, **overrides}
        )
        return result.claimed if result.claimed is not None else result.kind


def _sha(store: JobStore, script: str) -> str:
    sha: str = getattr(scripts, script.upper()).sha
    return sha


@pytest.fixture
async def proxy(redis_server: RedisProcess) -> AsyncIterator[LossyProxy]:
    p = await LossyProxy(redis_server.port).start()
    yield p
    await p.close()


async def snapshot(redis: Redis) -> dict[str, Any]:
    """Everything Redis holds, without times and stream ids; logs as their events in order."""
    out: dict[str, Any] = {}
    async for key in redis.scan_iter(count=1000):
        kind = await redis.type(key)
        value: Any
        if kind == "string":
            value = await redis.get(key)
        elif kind == "hash":
            fields = await redis.hgetall(key)  # type: ignore[misc]
            value = {f: v for f, v in fields.items() if f not in VOLATILE}
        elif kind == "set":
            value = sorted(await redis.smembers(key))  # type: ignore[misc]
        elif kind == "zset":  # members, and whether the score is 0 (handed back)
            value = sorted((m, s == 0) for m, s in await redis.zrange(key, 0, -1, withscores=True))
        elif kind == "stream":
            entries = [fields for _, fields in await redis.xrange(key)]
            if key.endswith(":log"):
                entries = [e for f in entries for e in json.loads(f["e"])["events"]]
            groups = []
            for g in await redis.xinfo_groups(key):
                consumers = await redis.xinfo_consumers(key, g["name"])
                groups.append(
                    (
                        g["name"],
                        g["pending"],
                        g.get("lag"),
                        {c["name"]: c["pending"] for c in consumers},
                    )
                )
            value = {"entries": entries, "groups": groups}
        else:
            value = kind
        out[key] = value
    return out


async def run_twice(
    redis: Redis, proxy: LossyProxy, scenario: Scenario, **store_args: Any
) -> tuple[list[Any], dict[str, Any]]:
    """Run ``scenario`` without, then with lost replies; assert both runs ended the same."""
    seen = []
    for lose in (False, True):
        await redis.flushall()
        for script in scripts.SCRIPTS:
            await script.load(redis)  # a lost NOSCRIPT reply would prove nothing
        client = connect(proxy.url, socket_timeout=5.0)
        try:
            run = Run(JobStore(client, Keys(), ttl_s=600, **store_args), proxy, lose)
            before = len(proxy.lost)
            results = await scenario(run)
            assert not proxy.armed, "an armed loss never happened"
            lost = proxy.lost[before:]
            assert len(lost) == run.armed
            for loss in lost:  # the script ran, and its reply (not an error) was lost
                assert loss.reply and not loss.reply.startswith(b"-"), loss.reply[:80]
                assert b"NOSCRIPT" not in loss.reply
        finally:
            await client.aclose()
        seen.append((results, await snapshot(redis)))
    (clean_results, clean_state), (lossy_results, lossy_state) = seen
    assert lossy_results == clean_results
    assert lossy_state == clean_state
    return clean_results, clean_state


async def test_the_client_retries_after_a_lost_reply(redis: Redis, proxy: LossyProxy) -> None:
    """``shared/redis.py``'s policy really replays: a command whose reply was lost returns
    (with the sync ``redis.retry.Retry`` the async client never retried, and raised)."""
    client = connect(proxy.url, socket_timeout=5.0)
    try:
        await client.set("k", "v")
        proxy.arm(b"INCR")
        assert await client.incr("counter") == 2  # ran twice: a plain command is no script
        assert len(proxy.lost) == 1 and proxy.lost[0].reply == b":1\r\n"
    finally:
        await client.aclose()


def tenant_job(tenant: str, **kwargs: Any) -> Job:
    job: Job = make_job(**kwargs)
    return job.model_copy(update={"tenant": tenant})


def ids(results: list[Any]) -> list[Any]:
    return [r.job.id if isinstance(r, Claimed) else r for r in results]


async def test_enqueue_replayed_adds_one_entry_and_counts_once(
    redis: Redis, proxy: LossyProxy
) -> None:
    # a tenant's share of the shared queue is 15 tokens: its second job (cost 10) is deferred
    a, b, c = tenant_job("t1"), tenant_job("t1"), tenant_job("t2")

    async def scenario(run: Run) -> list[Any]:
        for job in (a, b, c):
            if job is not c:
                run.lose_reply("enqueue")
            await run.store.enqueue(job)
        return []

    _, state = await run_twice(redis, proxy, scenario, fair_share_tokens=15)
    k = Keys()
    assert [e["job"] for e in state[k.queue(MODEL, Priority.NORMAL)]["entries"]] == [a.id, c.id]
    assert [e["job"] for e in state[k.deferred(MODEL, Priority.NORMAL, "t1")]["entries"]] == [b.id]
    assert state[k.backlog(MODEL)] == {"normal:tokens": "30", "normal:jobs": "3"}


async def test_pull_replayed_returns_the_job_it_claimed(redis: Redis, proxy: LossyProxy) -> None:
    jobs = [make_job() for _ in range(3)]

    async def scenario(run: Run) -> list[Any]:
        for job in jobs:
            await run.store.enqueue(job)
        run.lose_reply("pull")
        first = await run.pull()
        second = await run.pull()
        return ids([first, second])

    results, state = await run_twice(redis, proxy, scenario)
    assert results == [jobs[0].id, jobs[1].id]
    assert state[Keys().job(MODEL, jobs[2].id)]["state"] == "queued"  # not claimed, orphaned


async def test_pull_replayed_after_a_takeover_returns_that_claim(
    redis: Redis, proxy: LossyProxy
) -> None:
    dying, queued = make_job(), make_job()

    async def scenario(run: Run) -> list[Any]:
        for job in (dying, queued):
            await run.store.enqueue(job)
        taken = await run.pull("w1", lease_ms=1)  # w1 "dies": its lease ends at once
        await asyncio.sleep(0.02)
        run.lose_reply("pull")
        takeover = await run.pull("w2")
        assert isinstance(takeover, Claimed) and takeover.fence == 2
        return ids([taken, takeover])

    results, state = await run_twice(redis, proxy, scenario)
    assert results == [dying.id, dying.id]
    assert state[Keys().job(MODEL, queued.id)]["state"] == "queued"


async def test_emit_replayed_appends_nothing_and_counts_as_written(
    redis: Redis, proxy: LossyProxy
) -> None:
    job = make_job()

    async def scenario(run: Run) -> list[Any]:
        await run.store.enqueue(job)
        claimed = await run.pull()
        assert isinstance(claimed, Claimed)
        out: list[Any] = []
        run.lose_reply("emit")  # a started-only first batch
        out.append(
            await run.store.emit(
                claimed, EventBatch(events=[StartedEvent(s=0, worker="w1")]), new_tokens=0
            )
        )
        run.lose_reply("emit")
        batch = EventBatch(events=[TokenEvent(s=1, x="a"), TokenEvent(s=2, x="b")])
        out.append(await run.store.emit(claimed, batch, new_tokens=2))
        run.lose_reply("emit")  # the worker's path: a pipeline of EMIT calls
        out.extend(
            await run.store.emit_many(
                [Emit(claimed, EventBatch(events=[TokenEvent(s=3, x="c")]), 1)]
            )
        )
        run.lose_reply("emit")  # the terminal write: the replay finds the job completed
        done = DoneEvent(
            s=4, finish_reason="stop", usage=Usage(prompt_tokens=2, completion_tokens=3)
        )
        out.append(
            await run.store.emit(
                claimed, EventBatch(events=[done]), new_tokens=0, terminal=JobState.COMPLETED
            )
        )
        return out

    results, state = await run_twice(redis, proxy, scenario)
    assert results == [True, True, True, True]
    k = Keys()
    assert [e["s"] for e in state[k.job_log(MODEL, job.id)]["entries"]] == [0, 1, 2, 3, 4]
    assert state[k.job(MODEL, job.id)]["ntok"] == "3"
    assert state[k.job(MODEL, job.id)]["state"] == "completed"


async def test_emit_refuses_a_batch_that_is_not_next(redis: Redis) -> None:
    store = JobStore(redis, Keys(), ttl_s=600)
    job = make_job()
    await store.enqueue(job)
    pulled = await store.pull(MODEL, "w1", lease_ms=60_000, **PULL_ARGS)
    claimed = pulled.claimed
    assert claimed is not None
    assert await store.emit(claimed, EventBatch(events=[TokenEvent(s=1, x="a")]), new_tokens=1)
    # the same write again, but not as the latest write (another came after it)
    assert await store.emit(claimed, EventBatch(events=[TokenEvent(s=2, x="b")]), new_tokens=1)
    assert not await store.emit(claimed, EventBatch(events=[TokenEvent(s=1, x="a")]), new_tokens=1)
    # a hole
    assert not await store.emit(claimed, EventBatch(events=[TokenEvent(s=4, x="d")]), new_tokens=1)
    log = await store.read_log(MODEL, job.id)
    assert [e.s for entry in log for e in entry.batch.events] == [1, 2]


async def test_worker_emitter_rides_through_lost_replies(redis: Redis, proxy: LossyProxy) -> None:
    """The worker's own path (EventEmitter → EmitBatcher → EMIT): a lost reply to its final
    write does not turn into "lease lost"; the log holds every event once."""
    job = make_job()

    async def scenario(run: Run) -> list[Any]:
        await run.store.enqueue(job)
        claimed = await run.pull()
        assert isinstance(claimed, Claimed)
        batcher = EmitBatcher(run.store)
        emitter = EventEmitter(batcher, claimed, interval_s=0.0)
        try:
            await emitter.started("w1")
            for text in ("a", "b", "c"):
                await emitter.token(text)
            run.lose_reply("emit")
            await emitter.done("stop", Usage(prompt_tokens=2, completion_tokens=3))
        finally:
            await emitter.aclose()
            await batcher.close()
        return [emitter.seq]

    results, state = await run_twice(redis, proxy, scenario)
    assert results == [4]
    events = state[Keys().job_log(MODEL, job.id)]["entries"]
    assert [(e["t"], e["s"]) for e in events] == [
        ("started", 0),
        ("token", 1),
        ("token", 2),
        ("token", 3),
        ("done", 4),
    ]


async def test_renew_replayed_keeps_the_lease(redis: Redis, proxy: LossyProxy) -> None:
    jobs = [make_job(), make_job()]

    async def scenario(run: Run) -> list[Any]:
        claims = []
        for job in jobs:
            await run.store.enqueue(job)
            claimed = await run.pull()
            assert isinstance(claimed, Claimed)
            claims.append(claimed)
        run.lose_reply("renew")
        held = await run.store.renew(MODEL, {c.job.id: c.fence for c in claims}, 60_000)
        return [held]

    results, _ = await run_twice(redis, proxy, scenario)
    assert results == [{jobs[0].id: True, jobs[1].id: True}]


async def test_cancel_replayed_counts_once(redis: Redis, proxy: LossyProxy) -> None:
    running, queued, other = make_job(), make_job(), make_job()

    async def scenario(run: Run) -> list[Any]:
        for job in (running, queued, other):
            await run.store.enqueue(job)
        await run.pull()
        out = []
        for job in (running, queued):
            run.lose_reply("cancel")
            out.append(await run.store.cancel(MODEL, job.id))
        return out

    results, state = await run_twice(redis, proxy, scenario)
    assert results == ["cancelled", "cancelled"]
    assert state[Keys().backlog(MODEL)] == {"normal:tokens": "10", "normal:jobs": "1"}
    assert [e["s"] for e in state[Keys().job_log(MODEL, queued.id)]["entries"]] == [1]


async def test_handback_replayed_takes_one_delivery_off(redis: Redis, proxy: LossyProxy) -> None:
    job = make_job()

    async def scenario(run: Run) -> list[Any]:
        await run.store.enqueue(job)
        claimed = await run.pull()
        assert isinstance(claimed, Claimed)
        run.lose_reply("handback")
        handed = await run.store.handback(claimed)
        again = await run.pull("w2")  # taken over at once, as the hand-back promises
        return [handed, ids([again])]

    results, state = await run_twice(redis, proxy, scenario)
    assert results == [True, [job.id]]
    assert state[Keys().job(MODEL, job.id)]["deliveries"] == "1"  # w2's; w1's was given back
    assert len(state[Keys().wake(MODEL)]["entries"]) == 1
