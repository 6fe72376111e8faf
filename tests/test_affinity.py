"""Warm-state routing in the pull script, against real Redis: who takes a job, and how long
it may wait for the worker that holds its prefix warm."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis.asyncio import Redis

from shared.affinity import AffinityPolicy, session_key
from shared.jobs import JobStore, PullResult
from shared.keys import Keys
from shared.models import Priority
from shared.prefix import block_hashes
from shared.prompt import render_transcript
from tests.helpers import make_job
from worker.advertiser import Advertiser
from worker.warm import WarmPrefixes

MODEL = "sim-model"
KEYS = Keys()
SYSTEM = "You are a careful assistant who answers questions about queues. " * 40  # ~2.6 KB
WAIT_MS = 300


def store_for(redis: Redis, wait_ms: int = WAIT_MS) -> JobStore:
    return JobStore(redis, KEYS, ttl_s=600, affinity=AffinityPolicy(wait_ms, 60_000))


async def pull(store: JobStore, worker: str, *, seqs: int = 4, **kw: Any) -> PullResult:
    args: dict[str, Any] = {
        "free_tokens": 100_000,
        "free_seqs": seqs,
        "idle": seqs == 4,
        "lease_ms": 60_000,
        "aging_ms": {},
        "max_deliveries": 3,
        "worker_ttl_ms": 5_000,
    }
    return await store.pull(MODEL, worker, **{**args, **kw})


async def advertise(redis: Redis, worker: str, *texts: str, seqs: int = 4, ttl_ms: int = 5_000):
    """A worker whose engine holds ``texts`` warm, advertised the way workers do it."""
    warm = WarmPrefixes(max_blocks=1024)
    for text in texts:
        warm.add(block_hashes(text))
    adv = Advertiser(redis, KEYS, MODEL, worker, ttl_ms)
    await adv.beat(100_000, seqs, warm)
    return adv, warm


def chat_job(text: str, **kw: Any) -> Any:
    job = make_job(prompt=text, **kw)
    assert len(block_hashes(render_transcript(job))) >= 10
    return job


async def test_job_waits_for_the_worker_that_holds_its_prefix(redis: Redis) -> None:
    store = store_for(redis)
    await advertise(redis, "warm-w", SYSTEM)
    await advertise(redis, "cold-w")
    job = chat_job(SYSTEM + "User: what is a stream?")
    await store.enqueue(job)
    cold = await pull(store, "cold-w")
    assert cold.kind == "empty"  # reserved for warm-w, not taken
    assert 0 < cold.next_lease_ms <= WAIT_MS  # the cold worker wakes when the wait ends
    pending = await redis.xpending_range(KEYS.queue(MODEL, job.priority), "workers", "-", "+", 10)
    assert [p["consumer"] for p in pending] == ["warm-w"]  # visible as the warm worker's
    warm = await pull(store, "warm-w")
    assert warm.claimed is not None and warm.claimed.job.id == job.id
    assert warm.outcome == "warm" and warm.affinity_wait_ms < WAIT_MS
    assert await redis.zcard(KEYS.reserved(MODEL)) == 0
    assert await redis.zcard(KEYS.inbox(MODEL, "warm-w")) == 0
    state = await store.state(MODEL, job.id)
    assert state["aff"] == "warm" and state["aff_target"] == "warm-w"
    assert await redis.hget(KEYS.worker_state(MODEL, "warm-w"), "rjobs") == "0"


async def test_wait_is_bounded_then_any_worker_steals(redis: Redis) -> None:
    store = store_for(redis)
    await advertise(redis, "warm-w", SYSTEM)  # never pulls: stalled, or busy elsewhere
    await advertise(redis, "cold-w")
    job = chat_job(SYSTEM + "User: and a consumer group?")
    await store.enqueue(job)
    began = time.monotonic()
    first = await pull(store, "cold-w")
    assert first.kind == "empty"
    await asyncio.sleep(first.next_lease_ms / 1000)
    stolen = await pull(store, "cold-w")
    waited = (time.monotonic() - began) * 1000 + 5
    assert stolen.claimed is not None and stolen.claimed.job.id == job.id
    assert stolen.outcome == "stolen"
    assert stolen.affinity_wait_ms == WAIT_MS  # held exactly the wait, then released
    state = await store.state(MODEL, job.id)
    assert WAIT_MS <= int(state["aff_picked"]) <= waited + 1
    assert waited < WAIT_MS + 200
    pending = await redis.xpending_range(KEYS.queue(MODEL, job.priority), "workers", "-", "+", 10)
    assert [p["consumer"] for p in pending] == ["cold-w"]
    assert await redis.zcard(KEYS.inbox(MODEL, "warm-w")) == 0


async def test_full_warm_worker_is_waited_for_briefly_and_by_few(redis: Redis) -> None:
    """A full warm worker frees a slot soon; a long prefill elsewhere does not. It may be
    waited for (up to the wait) by at most two jobs beyond its slots, and only for a large
    gain; everything else goes to whoever pulls."""
    store = store_for(redis)
    await advertise(redis, "full-w", SYSTEM, seqs=0)  # warm, no free slot
    jobs = [chat_job(SYSTEM + f"User: question {i}") for i in range(3)]
    for job in jobs:
        await store.enqueue(job)
    taken = await pull(store, "cold-w")
    assert taken.claimed is not None and taken.claimed.job.id == jobs[2].id
    assert taken.outcome == "cold"
    assert await redis.zcard(KEYS.inbox(MODEL, "full-w")) == 2
    await asyncio.sleep(WAIT_MS / 1000)
    stolen = [await pull(store, "cold-w") for _ in range(2)]
    assert [r.outcome for r in stolen] == ["stolen", "stolen"]


async def test_small_gain_never_waits_for_a_full_or_dead_worker(redis: Redis) -> None:
    store = store_for(redis)
    short = SYSTEM[:1300]  # five blocks: too little prefill to wait for a busy worker
    await advertise(redis, "full-w", short, seqs=0)
    await advertise(redis, "dead-w", SYSTEM, ttl_ms=50)  # warm, then silent past its TTL
    await asyncio.sleep(0.1)
    job = chat_job(SYSTEM + "User: who takes this?")
    await store.enqueue(job)
    taken = await pull(store, "cold-w")
    assert taken.claimed is not None and taken.outcome == "cold"
    assert not await redis.sismember(KEYS.members(MODEL), "dead-w")  # pruned


async def test_ties_go_to_the_worker_with_more_room(redis: Redis) -> None:
    store = store_for(redis)
    await advertise(redis, "busy-w", SYSTEM, seqs=1)
    await advertise(redis, "roomy-w", SYSTEM, seqs=3)
    job = chat_job(SYSTEM + "User: a new conversation")
    await store.enqueue(job)
    assert (await pull(store, "cold-w")).kind == "empty"
    assert await redis.zcard(KEYS.inbox(MODEL, "roomy-w")) == 1


async def test_no_reservation_when_the_puller_is_as_warm(redis: Redis) -> None:
    store = store_for(redis)
    await advertise(redis, "a", SYSTEM)
    await advertise(redis, "b", SYSTEM)
    job = chat_job(SYSTEM + "User: equal?")
    await store.enqueue(job)
    taken = await pull(store, "b")
    assert taken.claimed is not None and taken.outcome == "warm"


async def test_affinity_off_is_plain_fifo(redis: Redis) -> None:
    store = JobStore(redis, KEYS, ttl_s=600)  # no policy: cache-blind
    await advertise(redis, "warm-w", SYSTEM)
    job = chat_job(SYSTEM + "User: blind?")
    await store.enqueue(job)
    taken = await pull(store, "cold-w")
    assert taken.claimed is not None and taken.outcome == "cold"


async def test_priority_still_wins_over_warmth(redis: Redis) -> None:
    store = store_for(redis)
    await advertise(redis, "warm-w", SYSTEM)
    await advertise(redis, "cold-w", seqs=0)
    warm_normal = chat_job(SYSTEM + "User: normal")
    await store.enqueue(warm_normal)
    assert (await pull(store, "cold-w")).kind == "empty"  # reserves it for warm-w
    urgent = make_job(priority="high", prompt="an unrelated urgent question")
    await store.enqueue(urgent)
    first = await pull(store, "warm-w")
    assert first.claimed is not None and first.claimed.job.id == urgent.id
    second = await pull(store, "warm-w")
    assert second.claimed is not None and second.claimed.job.id == warm_normal.id


async def test_session_goes_back_to_the_worker_of_its_last_turn(redis: Redis) -> None:
    store = store_for(redis)
    other_gateway = store_for(redis)  # session affinity lives in Redis, not in a gateway
    await advertise(redis, "a")
    await advertise(redis, "b")
    sid = session_key("anonymous", "conversation-1")
    turn1 = make_job(prompt="short turn one")
    turn1.session = sid
    await store.enqueue(turn1)
    taken = await pull(store, "a")
    assert taken.claimed is not None
    turn2 = make_job(prompt="short turn two")
    turn2.session = sid
    await other_gateway.enqueue(turn2)
    assert (await pull(store, "b")).kind == "empty"  # reserved for a
    taken = await pull(store, "a")
    assert taken.claimed is not None and taken.claimed.job.id == turn2.id
    assert taken.outcome == "warm"


async def test_cancel_of_a_reserved_job_clears_the_reservation(redis: Redis) -> None:
    store = store_for(redis)
    await advertise(redis, "warm-w", SYSTEM)
    job = chat_job(SYSTEM + "User: never mind")
    await store.enqueue(job)
    assert (await pull(store, "cold-w")).kind == "empty"
    assert await redis.hget(KEYS.worker_state(MODEL, "warm-w"), "rjobs") == "1"
    assert await store.cancel(MODEL, job.id) == "cancelled"
    assert await redis.zcard(KEYS.reserved(MODEL)) == 0
    assert await redis.zcard(KEYS.inbox(MODEL, "warm-w")) == 0
    assert await redis.hget(KEYS.worker_state(MODEL, "warm-w"), "rjobs") == "0"
    assert await redis.xlen(KEYS.queue(MODEL, job.priority)) == 0
    assert (await pull(store, "warm-w")).kind == "empty"


async def test_release_hands_reservations_to_others_at_once(redis: Redis) -> None:
    store = store_for(redis, wait_ms=60_000)
    await advertise(redis, "leaving-w", SYSTEM)
    job = chat_job(SYSTEM + "User: draining")
    await store.enqueue(job)
    assert (await pull(store, "cold-w")).kind == "empty"
    assert await store.release(MODEL, "leaving-w") == 1
    taken = await pull(store, "cold-w")
    assert taken.claimed is not None and taken.outcome == "stolen"
    assert not await redis.exists(KEYS.warm(MODEL, "leaving-w"))


async def test_wait_never_exceeds_a_quarter_of_the_deadline(redis: Redis) -> None:
    store = store_for(redis, wait_ms=60_000)
    await advertise(redis, "warm-w", SYSTEM)
    job = chat_job(SYSTEM + "User: hurry", deadline_ms=800)
    await store.enqueue(job)
    empty = await pull(store, "cold-w")
    assert empty.kind == "empty" and empty.next_lease_ms <= 200


async def test_advertisement_is_bounded_and_expires(redis: Redis) -> None:
    warm = WarmPrefixes(max_blocks=64)
    for i in range(50):
        warm.add(block_hashes(f"conversation {i} " * 200))
    assert len(warm.blocks()) <= 64
    adv = Advertiser(redis, KEYS, MODEL, "w", 200)
    await adv.beat(1000, 1, warm)
    assert 0 < await redis.scard(KEYS.warm(MODEL, "w")) <= 64
    evicted = warm.add(block_hashes("a new conversation " * 200))
    assert evicted
    await adv.sync(warm)
    assert await redis.smembers(KEYS.warm(MODEL, "w")) == warm.blocks()
    await asyncio.sleep(0.3)
    assert not await redis.exists(KEYS.warm(MODEL, "w"))
    assert not await redis.exists(KEYS.worker_state(MODEL, "w"))
    await adv.beat(1000, 1, warm)  # the set expired: the next beat writes it whole
    assert await redis.smembers(KEYS.warm(MODEL, "w")) == warm.blocks()


async def test_deadline_passing_while_reserved_expires_the_job(redis: Redis) -> None:
    store = store_for(redis, wait_ms=60_000)
    await advertise(redis, "warm-w", SYSTEM)
    job = chat_job(SYSTEM + "User: too late", deadline_ms=300)
    await store.enqueue(job)
    assert (await pull(store, "cold-w")).kind == "empty"
    await asyncio.sleep(0.35)
    late = await pull(store, "cold-w")
    assert late.kind == "skipped"
    assert (await store.state(MODEL, job.id))["state"] == "expired"
    assert await redis.zcard(KEYS.reserved(MODEL)) == 0


async def test_aging_and_fair_share_hold_with_affinity(redis: Redis) -> None:
    store = JobStore(
        redis, KEYS, ttl_s=600, fair_share_tokens=10, affinity=AffinityPolicy(60_000, 60_000)
    )
    await advertise(redis, "warm-w", SYSTEM, seqs=1)
    flood = []
    for i in range(3):  # one tenant's warm jobs: one fits its share, two are deferred
        job = chat_job(SYSTEM + f"User: flood {i}")
        job.tenant = "flooder"
        flood.append(job)
        await store.enqueue(job)
    other = make_job(prompt="a newcomer's short question")
    other.tenant = "newcomer"
    await store.enqueue(other)
    taken = await pull(store, "cold-w")  # reserves the flooder's first job, takes the newcomer
    assert taken.claimed is not None and taken.claimed.job.id == other.id
    assert await redis.zcard(KEYS.reserved(MODEL)) == 1
    warm = await pull(store, "warm-w", seqs=1, idle=True)
    assert warm.claimed is not None and warm.claimed.job.id == flood[0].id
    # the flooder's share freed: its next job moved into the shared queue, in order
    queued = await redis.xrange(KEYS.queue(MODEL, flood[1].priority))
    assert any(fields["job"] == flood[1].id for _, fields in queued)
    assert not await redis.exists(KEYS.deferred(MODEL, flood[1].priority, "flooder")) or (
        await redis.xlen(KEYS.deferred(MODEL, flood[1].priority, "flooder")) == 1
    )


async def test_aged_low_job_goes_before_a_reserved_warm_one(redis: Redis) -> None:
    store = store_for(redis, wait_ms=60_000)
    await advertise(redis, "warm-w", SYSTEM)
    warm_job = chat_job(SYSTEM + "User: warm but normal")
    await store.enqueue(warm_job)
    assert (await pull(store, "cold-w")).kind == "empty"  # reserved for warm-w
    low = make_job(priority="low", prompt="an old low-priority question")
    await store.enqueue(low)
    await asyncio.sleep(0.05)
    first = await pull(store, "warm-w", aging_ms={Priority.LOW: 10})
    assert first.claimed is not None and first.claimed.job.id == low.id
    second = await pull(store, "warm-w")
    assert second.claimed is not None and second.claimed.job.id == warm_job.id
