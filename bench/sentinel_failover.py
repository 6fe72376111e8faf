"""Sentinel failover under load: streams through two gateways and two workers while the Redis
master is ``kill -9``-ed; what the clients saw.

A master, one replica and three ``redis-sentinel`` processes on loopback
(``tests/faults/sentinel.py``); every Slipstream process gets the ``redis+sentinel://`` URL.
Once every stream has its first tokens, the master dies. Reported: how long until the first
token after the kill (the earliest stream, the median stream and the slowest), streams
completed, and tokens lost or duplicated as the clients saw them (SSE ids missing or repeated,
and text different from the simulator's uninterrupted greedy answer). The test
``tests/faults/test_sentinel.py`` runs the same scenario and asserts on it.

    flock /tmp/slipstream-bench.lock .venv/bin/python -m bench.sentinel_failover \\
        --streams 50 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.keys import Keys
from shared.redis import connect
from tests.faults.cluster import (
    FAST_LEASES,
    Cluster,
    StreamRecord,
    stream_completion,
    wait_frames,
    wait_workers,
)
from tests.faults.sentinel import SentinelSet
from worker.engines.sim import greedy_text

MAX_TOKENS = 60
SIM = ("--max-seqs", "32", "--sim-ttft-ms", "5", "--sim-tokens-per-s", "15")


@dataclass
class Outcome:
    """One failover run, as the clients saw it."""

    streams: int
    min_replicas: int
    failover_s: float = 0.0  # kill -> every sentinel names the new master
    first_token_after_kill_s: float = 0.0  # kill -> the first stream flowing again
    resume_p50_s: float = 0.0  # kill -> a stream flowing again, median over the streams
    resume_max_s: float = 0.0
    completed: int = 0  # streams that ended with [DONE] and exactly one finish
    text_equal: int = 0  # streams whose text equals the uninterrupted greedy answer
    tokens_lost: int = 0  # SSE ids missing from the sequence
    tokens_duplicated: int = 0  # SSE ids seen twice
    records: list[StreamRecord] = field(default_factory=list, repr=False)
    prompts: list[str] = field(default_factory=list, repr=False)

    def figures(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("records")
        out.pop("prompts")
        return out


def start_fleet(group: SentinelSet, min_replicas: int) -> Cluster:
    """Two gateways and two sim workers, all on the Sentinel URL."""
    env = {
        **os.environ,
        **FAST_LEASES,
        "REDIS_URL": group.url,
        "SLIPSTREAM_REDIS_MIN_REPLICAS": str(min_replicas),
    }
    cluster = Cluster(group.master, env)
    cluster.gateway()
    cluster.gateway()
    cluster.worker("a", *SIM)
    cluster.worker("b", *SIM)
    return cluster


async def failover(streams: int, min_replicas: int, password: str | None = "s3cret") -> Outcome:
    """Run ``streams`` streams, kill the master once each has tokens, let them all finish."""
    group = SentinelSet.start(password=password)
    cluster: Cluster | None = None
    outcome = Outcome(streams, min_replicas)
    try:
        cluster = start_fleet(group, min_replicas)
        await wait_workers(group.url, 2, 30.0)
        bases = [f"http://127.0.0.1:{p.port}" for p in cluster.procs if p.port]
        outcome.prompts = [f"failover {min_replicas} {i}" for i in range(streams)]
        outcome.records = [StreamRecord() for _ in range(streams)]
        tasks = [
            asyncio.create_task(stream_completion(bases[i % 2], p, MAX_TOKENS, r, timeout=90))
            for i, (p, r) in enumerate(zip(outcome.prompts, outcome.records, strict=True))
        ]
        await asyncio.gather(*(wait_frames(r, 3, timeout=60) for r in outcome.records))
        killed_at = time.monotonic()
        old = group.kill_master()
        await asyncio.to_thread(group.wait_failover, old)
        outcome.failover_s = time.monotonic() - killed_at
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 90)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise RuntimeError(f"{len(errors)} streams failed: {errors[:3]}")
        judge(outcome, killed_at)
        return outcome
    finally:
        if cluster is not None:
            cluster.stop()
        group.stop()


def judge(outcome: Outcome, killed_at: float) -> None:
    """Fill in what the clients saw against the simulator's uninterrupted answers."""
    resumes = []
    for prompt, record in zip(outcome.prompts, outcome.records, strict=True):
        ids = record.ids()
        if ids:
            expected = range(ids[0], max(ids) + 1)
            outcome.tokens_lost += len(set(expected) - set(ids))
            outcome.tokens_duplicated += len(ids) - len(set(ids))
        finished = record.frames and record.frames[-1][1] == "[DONE]"
        outcome.completed += int(bool(finished) and len(record.terminals()) == 1)
        outcome.text_equal += int(record.text() == greedy_text(prompt, MAX_TOKENS))
        resumed = resumed_at(record, killed_at)
        if resumed is not None:
            resumes.append(resumed - killed_at)
    if resumes:
        outcome.first_token_after_kill_s = min(resumes)
        outcome.resume_p50_s = statistics.median(resumes)
        outcome.resume_max_s = max(resumes)


def resumed_at(record: StreamRecord, killed_at: float) -> float | None:
    """When the stream flowed again after the kill: the frame that ends its longest silence
    ending after the kill (tokens already in flight at the kill arrive before that silence)."""
    times = [t for _, data, t in record.frames if data.startswith("{")]
    gaps = [(b - a, b) for a, b in itertools.pairwise(times) if b > killed_at]
    return max(gaps)[1] if gaps else None


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| MIN_REPLICAS | streams | sentinel failover (s) | first token after kill (s) "
        "| resume p50 / max (s) | completed | text equal | tokens lost | duplicated |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['min_replicas']} | {r['streams']} | {r['failover_s']:.2f} "
        f"| {r['first_token_after_kill_s']:.2f} | {r['resume_p50_s']:.2f} / "
        f"{r['resume_max_s']:.2f} | {r['completed']} | {r['text_equal']} "
        f"| {r['tokens_lost']} | {r['tokens_duplicated']} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


async def enqueue_cost(min_replicas: int, n: int) -> dict[str, float]:
    """Median and p99 latency of ``JobStore.enqueue`` on a master with one replica."""
    from shared.jobs import JobStore
    from tests.helpers import make_job

    group = SentinelSet.start()
    redis = connect(group.url)
    try:
        store = JobStore(redis, Keys(), ttl_s=60, min_replicas=min_replicas)
        times = []
        for i in range(n):
            job = make_job("cost", prompt=f"cost {i}")
            began = time.perf_counter()
            await store.enqueue(job)
            times.append((time.perf_counter() - began) * 1000)
        times.sort()
        return {
            "min_replicas": min_replicas,
            "enqueues": n,
            "p50_ms": statistics.median(times),
            "p99_ms": times[int(0.99 * (n - 1))],
        }
    finally:
        await redis.aclose()
        group.stop()


async def main_async(args: argparse.Namespace) -> None:
    rows: list[dict[str, Any]] = []
    for min_replicas in args.min_replicas:
        for _ in range(args.runs):
            outcome = await failover(args.streams, min_replicas)
            rows.append(outcome.figures())
            print(json.dumps(rows[-1]), flush=True)
    costs = [await enqueue_cost(m, args.enqueues) for m in args.min_replicas]
    for cost in costs:
        print(json.dumps(cost), flush=True)
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"failovers": rows, "enqueue_cost": costs}, out, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--runs", type=int, default=1, help="failovers per setting")
    parser.add_argument("--min-replicas", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--enqueues", type=int, default=2000, help="for the WAIT cost")
    parser.add_argument("--out", default="", help="write the figures as JSON here")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
