"""Worker faults with real processes: kill -9, SIGSTOP zombies, long jobs, poison, drain."""

from __future__ import annotations

import asyncio
import random
import signal
import time

import httpx

from shared.keys import Keys
from shared.models import Priority, TokenEvent
from shared.redis import connect
from tests.faults.cluster import (
    Cluster,
    StreamRecord,
    check_stream,
    percentile,
    record_result,
    stream_completion,
    wait_frames,
)
from worker.engines.sim import greedy_text as sim_text

SIM = ("--max-seqs", "4", "--sim-ttft-ms", "5", "--sim-tokens-per-s", "100")


async def owner_of(cluster: Cluster, job_id: str, model: str = "sim-model") -> str:
    redis = connect(cluster.redis.url)
    try:
        for _ in range(200):
            owner = await redis.hget(Keys().job(model, job_id), "owner")
            if owner:
                return str(owner)
            await asyncio.sleep(0.01)
        raise TimeoutError("job has no owner")
    finally:
        await redis.aclose()


async def pending_entries(cluster: Cluster) -> int:
    redis = connect(cluster.redis.url)
    try:
        total = 0
        for p in Priority.ordered():
            queue = Keys().queue("sim-model", p)
            if not await redis.exists(queue):  # a priority nothing was queued at
                continue
            info = await redis.xpending(queue, "workers")
            total += int(info["pending"])
        return total
    finally:
        await redis.aclose()


async def test_kill_9_mid_stream_continues_on_another_worker(cluster: Cluster, trials: int) -> None:
    rng = random.Random(20261128)
    gateway = cluster.gateway()
    workers = {f"w{i}": cluster.worker(f"w{i}", *SIM) for i in range(3)}
    await cluster.wait_workers(3)
    base = f"http://127.0.0.1:{gateway.port}"
    gaps: list[float] = []
    lost = duplicated = 0
    for trial in range(trials):
        record, prompt = StreamRecord(), f"trial {trial} of the kill test"
        task = asyncio.create_task(stream_completion(base, prompt, 40, record))
        await wait_frames(record, rng.randint(1, 30))
        victim = await owner_of(cluster, record.job_id)
        workers.pop(victim).kill()
        replacement = f"w{trials + trial}"
        workers[replacement] = cluster.worker(replacement, *SIM)
        await asyncio.wait_for(task, 30)
        ids = record.ids()
        duplicated += len(ids) - len(set(ids))
        lost += int(record.text() != sim_text(prompt, 40))
        check_stream(record, sim_text(prompt, 40))
        gaps.append(record.largest_gap_s())
    await asyncio.sleep(0.2)
    assert await pending_entries(cluster) == 0
    record_result(
        "worker kill -9 mid-stream (sim)",
        trials=trials,
        lost=lost,
        duplicated=duplicated,
        recovered=trials - lost,
        recover_p50_s=percentile(gaps, 0.5),
        recover_p99_s=percentile(gaps, 0.99),
    )


async def test_sigstopped_zombie_is_fenced_off(cluster: Cluster) -> None:
    gateway = cluster.gateway()
    first = cluster.worker("a", *SIM[:2], "--sim-tokens-per-s", "40")
    await cluster.wait_workers(1)
    cluster.worker("b", *SIM[:2], "--sim-tokens-per-s", "40")
    await cluster.wait_workers(2)
    record, prompt = StreamRecord(), "zombie test"
    base = f"http://127.0.0.1:{gateway.port}"
    task = asyncio.create_task(stream_completion(base, prompt, 60, record))
    await wait_frames(record, 5)
    owner = await owner_of(cluster, record.job_id)
    zombie = first if owner == "a" else next(p for p in cluster.procs if p.name == "worker-b")
    zombie.signal(signal.SIGSTOP)
    await asyncio.wait_for(task, 30)
    zombie.signal(signal.SIGCONT)
    await asyncio.sleep(1.0)  # the zombie wakes up and tries to write and ack
    check_stream(record, sim_text(prompt, 60))
    redis = connect(cluster.redis.url)
    try:
        job = await redis.hgetall(Keys().job("sim-model", record.job_id))
        log = await redis.xrange(Keys().job_log("sim-model", record.job_id))
    finally:
        await redis.aclose()
    assert job["state"] == "completed" and job["owner"] != owner
    # taken over once; a third claim is the survivor taking its own job back when its 0.6 s
    # lease lapsed on a loaded machine (seen once in CI), which the checks below still cover
    assert int(job["deliveries"]) >= 2
    from shared.models import EventBatch

    seqs = [
        e.s
        for _, f in log
        for e in EventBatch.model_validate_json(f["e"]).events
        if isinstance(e, TokenEvent)
    ]
    assert seqs == list(range(1, 61)), "the log holds each token exactly once"
    assert zombie.popen.poll() is None, "the zombie lives on, fenced off"
    record_result(
        "SIGSTOP past lease, SIGCONT (zombie)",
        trials=1,
        lost=0,
        duplicated=0,
        recovered=1,
        recover_p50_s=record.largest_gap_s(),
        recover_p99_s=record.largest_gap_s(),
    )


async def test_long_healthy_generation_is_never_taken_over(cluster: Cluster) -> None:
    gateway = cluster.gateway()
    cluster.worker("a", "--sim-tokens-per-s", "20")
    cluster.worker("b", "--sim-tokens-per-s", "20")
    await cluster.wait_workers(2)
    record, prompt = StreamRecord(), "a long and healthy generation"
    started = time.monotonic()
    await stream_completion(f"http://127.0.0.1:{gateway.port}", prompt, 40, record)
    duration = time.monotonic() - started
    assert duration >= 3 * 0.6, "the generation must outlast three leases"
    check_stream(record, sim_text(prompt, 40))
    redis = connect(cluster.redis.url)
    try:
        deliveries = await redis.hget(Keys().job("sim-model", record.job_id), "deliveries")
    finally:
        await redis.aclose()
    assert deliveries == "1"
    record_result(
        "healthy generation of 3x the lease",
        trials=1,
        lost=0,
        duplicated=0,
        recovered=1,
        taken_over=0,
        duration_s=round(duration, 2),
    )


async def test_poison_job_goes_to_dead_letter(cluster: Cluster) -> None:
    env = {"SLIPSTREAM_SIM_CRASH_PROMPT": "POISON", "SLIPSTREAM_MAX_DELIVERIES": "2"}
    gateway = cluster.gateway()
    for i in range(3):
        cluster.worker(f"p{i}", *SIM, **env)
    await cluster.wait_workers(3)
    base = f"http://127.0.0.1:{gateway.port}"
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:

        def ask(prompt: str) -> object:
            body = {"model": "sim-model", "prompt": prompt, "max_tokens": 5}
            return client.post("/v1/completions", json=body)

        poison = asyncio.create_task(ask("this is POISON"))  # type: ignore[arg-type]
        await asyncio.sleep(0.3)
        normal = [asyncio.create_task(ask(f"normal {i}")) for i in range(6)]  # type: ignore[arg-type]
        poisoned = await poison
        answers = await asyncio.gather(*normal)
    assert poisoned.status_code == 500  # type: ignore[attr-defined]
    assert poisoned.json()["error"]["code"] == "poison_job"  # type: ignore[attr-defined]
    assert all(r.status_code == 200 for r in answers)  # type: ignore[attr-defined]
    redis = connect(cluster.redis.url)
    try:
        assert await redis.xlen(Keys().dead_letter("sim-model")) == 1
    finally:
        await redis.aclose()
    dead = [p for p in cluster.procs if p.name.startswith("worker") and p.popen.poll() is not None]
    assert len(dead) == 2
    record_result(
        "poison job",
        trials=1,
        lost=0,
        duplicated=0,
        recovered=1,
        dead_lettered=1,
        workers_killed=len(dead),
        others_served=len(answers),
    )


async def test_sigterm_drain_finishes_or_hands_back(cluster: Cluster) -> None:
    gateway = cluster.gateway()
    base = f"http://127.0.0.1:{gateway.port}"
    patient = cluster.worker("patient", *SIM, SLIPSTREAM_DRAIN_GRACE_S="10")
    await cluster.wait_workers(1)
    records = [StreamRecord() for _ in range(3)]
    tasks = [
        asyncio.create_task(stream_completion(base, f"drain {i}", 40, r))
        for i, r in enumerate(records)
    ]
    for r in records:
        await wait_frames(r, 3)
    patient.signal(signal.SIGTERM)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    for i, r in enumerate(records):
        check_stream(r, sim_text(f"drain {i}", 40))
    assert patient.popen.wait(15) == 0
    # A short grace period: what is left is handed back and taken over at once.
    hasty = cluster.worker("hasty", *SIM, SLIPSTREAM_DRAIN_GRACE_S="0.05", SLIPSTREAM_LEASE_S="30")
    await cluster.wait_workers(1)
    records = [StreamRecord() for _ in range(3)]
    tasks = [
        asyncio.create_task(stream_completion(base, f"handback {i}", 60, r))
        for i, r in enumerate(records)
    ]
    for r in records:
        await wait_frames(r, 3)
    cluster.worker("heir", *SIM, SLIPSTREAM_LEASE_S="30")
    await cluster.wait_workers(2)
    hasty.signal(signal.SIGTERM)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    gaps = [r.largest_gap_s() for r in records]
    for i, r in enumerate(records):
        check_stream(r, sim_text(f"handback {i}", 60))
    assert max(gaps) < 5.0, f"taken over at once, not after the 30 s lease: {gaps}"
    record_result(
        "SIGTERM drain (grace 10 s, then 0.05 s with hand-back)",
        trials=6,
        lost=0,
        duplicated=0,
        recovered=6,
        recover_p50_s=percentile(gaps, 0.5),
        recover_p99_s=percentile(gaps, 0.99),
    )
