"""Experiment 3, scale of streams: N concurrent SSE streams on one gateway process, each
delivering 1 token/s, keep-alive pings on.

Measured while all N are open (the hold): the gateway's resident memory per stream (over its
RSS before the ramp), delivery latency from publish to client (the worker's ``EMIT`` script
logs and publishes each batch at once, so the log entry's Redis timestamp is the publish
time; a sample of the streams is held by a process of its own, ``bench.stamper``, which stamps
arrival with the same wall clock), and event-loop lag as the round trip of ``GET /healthz``
from a separate probe process.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.arms import SlipstreamArm
from bench.client import Stamps, Target, one_request, run_closed
from bench.fleet import MODEL, Backend
from bench.process import PYTHON, gateway_split, own_cpu_seconds
from bench.result import Result
from bench.stamper import Stamper
from bench.stats import percentile
from bench.trace import TraceRequest

STREAM_WORKERS = 4  # simulated workers behind the gateway (``_one_count``)


async def _loop_lag(stop: asyncio.Event, lags: list[float]) -> None:
    """The load generator's own event-loop lag (sleep overshoot), for context."""
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(0.05)
        lags.append((time.perf_counter() - started - 0.05) * 1000)


async def _probe(url: str, seconds: float) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "bench.probe",
        "--url",
        url,
        "--seconds",
        str(seconds),
        "--hz",
        "20",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
        return dict(json.loads(out))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _delivery(
    arm: SlipstreamArm, sampled: list[tuple[str | None, Stamps]], since: float
) -> list[float]:
    """Publish-to-client latency (ms) of sampled tokens that arrived after ``since`` (wall)."""
    from shared.jobs import JobStore
    from shared.keys import Keys

    store = JobStore(arm.redis, Keys(), ttl_s=3600)
    out: list[float] = []
    for job_id, stamps in sampled:
        if not job_id or not stamps:
            continue
        published: dict[int, int] = {}
        for entry in await store.read_log(MODEL, job_id):
            ms = int(entry.stream_id.split("-")[0])
            for event in entry.batch.events:
                if event.t == "token":
                    published[event.s] = ms
        out += [
            wall * 1000 - published[seq]
            for seq, wall in stamps
            if wall >= since and seq in published
        ]
    return out


async def _open(
    target: Target, n: int, plan: Any, tokens: int
) -> tuple[list[Result], list[asyncio.Task[Result]]]:
    """The ``n`` streams the load generator holds (the sample is the stamper's)."""
    results: list[Result] = []
    tasks: list[asyncio.Task[Result]] = []
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / plan.stream_ramp_per_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        req = TraceRequest(
            i, i / plan.stream_ramp_per_s, f"stream {i}", tokens, "normal", 3_600_000
        )
        result = Result(req.idx, req.at_s, req.priority, req.max_tokens, req.deadline_ms)
        results.append(result)
        coro = one_request(target, req, t0, timeout_s=3600, result=result)
        tasks.append(asyncio.create_task(coro))
    return results, tasks


async def _wait_open(results: list[Result], timeout: float) -> float:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sum(1 for r in results if r.status == 200) >= len(results):
            break
        await asyncio.sleep(0.2)
    return sum(1 for r in results if r.status == 200)


def stream_fleet(n: int) -> list[Backend]:
    """The simulated workers behind ``n`` slow streams: room for all of them, on several
    workers. One pulls a job per round trip, and on the load generator's full core a round
    trip takes milliseconds: a single worker started jobs more slowly than the ramp opened
    them (at 10,000 streams a quarter were still queued when the hold ended)."""
    k = STREAM_WORKERS
    return [
        Backend(f"streamer-{i}", slots=n // k + 64, tokens_per_s=1.0, ttft_ms=0.0) for i in range(k)
    ]


async def wait_started(
    results: list[Result], tasks: list[asyncio.Task[Result]], timeout: float
) -> tuple[int, float]:
    """Wait until every open stream has had its first token, so the hold measures streams that
    all deliver (a queued stream sends only progress notes and reads its log now and then):
    how many had, and the seconds it took. A stream that ended meanwhile is not waited for."""
    started, end = time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < end:
        if all(
            r.ttft_ms is not None or t.done()
            for r, t in zip(results, tasks, strict=True)
            if r.status == 200
        ):
            break
        await asyncio.sleep(0.2)
    running = sum(1 for r in results if r.status == 200 and r.ttft_ms is not None)
    return running, round(time.monotonic() - started, 1)


async def _hold(arm: SlipstreamArm, plan: Any) -> tuple[list[int], dict[str, Any]]:
    """Sample the gateway's RSS while the probe runs; also the CPU cores each component used."""
    assert arm.gateway is not None
    probe = asyncio.create_task(_probe(f"{arm.target().base_url}/healthz", plan.stream_hold_s))
    arm.group.mark_cpu()
    client_cpu, started = own_cpu_seconds(), time.monotonic()
    rss: list[int] = []
    while time.monotonic() < started + plan.stream_hold_s:
        rss.append(arm.gateway.rss_bytes())
        await asyncio.sleep(0.5)
    probed = await probe
    took = time.monotonic() - started
    cores = {k: round(v / took, 2) for k, v in arm.group.cpu_since_mark().items()}
    cores["client"] = round((own_cpu_seconds() - client_cpu) / took, 2)
    return rss, probed | {"cpu_cores": cores}


async def one_count(n: int, plan: Any, workdir: Path) -> dict[str, Any]:
    """One stream count; with ``plan.pin`` the gateway has a CPU to itself."""
    gw_env = {"SLIPSTREAM_SSE_PING_S": str(plan.stream_ping_s)}
    gw_cpus, others = gateway_split(plan.pin)
    mine = os.sched_getaffinity(0)
    if others:  # the load generator (and the probe it starts) off the gateway's core
        os.sched_setaffinity(0, others)
    try:
        row = await _one_count(n, plan, workdir, gw_env, (gw_cpus, others))
    finally:
        os.sched_setaffinity(0, mine)
    gateway_cores = row.get("cpu_cores", {}).get("gateway")
    events_per_s = row["opened"] * row["tokens_per_s_per_stream"]
    if gateway_cores and events_per_s:
        row["gateway_us_per_event"] = round(gateway_cores * 1e6 / events_per_s, 1)
    row["gateway_pinned"] = gw_cpus is not None
    return row


async def _one_count(
    n: int,
    plan: Any,
    workdir: Path,
    gw_env: dict[str, str],
    cpus: tuple[frozenset[int] | None, frozenset[int] | None],
) -> dict[str, Any]:
    fleet = stream_fleet(n)
    ramp_s = n / plan.stream_ramp_per_s
    tokens = int(ramp_s + plan.stream_hold_s + 60)
    arm = SlipstreamArm(
        fleet, workdir / f"streams-{n}", cpus[1], gateway_env=gw_env, gateway_cpus=cpus[0]
    )
    async with arm:
        assert arm.gateway is not None
        baseline = await _warm(arm)
        stop, lags = asyncio.Event(), []
        lagger = asyncio.create_task(_loop_lag(stop, lags))
        sample = min(n, plan.stream_sample)
        stamper = await Stamper.start(arm.target(), sample, tokens, ramp_s)
        tasks: list[asyncio.Task[Result]] = []
        try:
            results, tasks = await _open(arm.target(), n - sample, plan, tokens)
            opened = await _wait_open(results, 30 + ramp_s)
            opened += await stamper.opened(60 + ramp_s)
            running, start_wait_s = await wait_started(results, tasks, 60 + ramp_s)
            await asyncio.sleep(2.0)  # let the ramp's burst settle
            since = time.time()
            rss, probe = await _hold(arm, plan)
            sampled = await stamper.finish(since, plan.stream_hold_s)
            latencies = await _delivery(arm, sampled.streams, since)
        finally:
            stop.set()
            await stamper.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, lagger, return_exceptions=True)
    plateau = statistics.median(rss) if rss else 0
    return {
        "streams": n,
        "opened": opened,
        "running_of_unsampled": running,  # had their first token before the hold
        "unsampled": n - sample,  # the load generator's (the stamper holds the rest)
        "start_wait_s": start_wait_s,
        "errors": sorted({r.error for r in results if r.error} | sampled.errors)[:3],
        "rss_baseline_mb": round(baseline / 2**20, 1),
        "rss_plateau_mb": round(plateau / 2**20, 1),
        "kb_per_stream": round((plateau - baseline) / 1024 / max(1, opened), 2),
        "delivery_p50_ms": percentile(latencies, 50),
        "delivery_p99_ms": percentile(latencies, 99),
        "delivery_samples": len(latencies),
        "tokens_per_s_per_stream": round(sampled.tokens_per_s, 3),
        "healthz": {k: v for k, v in probe.items() if k != "cpu_cores"},
        "cpu_cores": probe.get("cpu_cores", {}),
        "client_loop_lag_p99_ms": percentile(lags, 99),
    }


async def _warm(arm: SlipstreamArm) -> int:
    """A few short requests through the arm, then the gateway's RSS (the baseline)."""
    assert arm.gateway is not None
    warm = [TraceRequest(10**7 + i, 0.0, "warm", 1, "normal", 60_000) for i in range(16)]
    await run_closed(arm.target(), warm, concurrency=16)
    await asyncio.sleep(1.0)
    return arm.gateway.rss_bytes()


async def run_streams(plan: Any, workdir: Path) -> dict[str, Any]:
    rows = []
    for n in plan.stream_counts:
        try:
            rows.append(await one_count(n, plan, workdir))
        except (RuntimeError, TimeoutError, OSError) as exc:
            rows.append({"streams": n, "failed": f"{type(exc).__name__}: {exc}"[:500]})
            print(f"streams {n}: {exc}", file=sys.stderr)
            break
    return {
        "rows": rows,
        "ping_s": plan.stream_ping_s,
        "ramp_per_s": plan.stream_ramp_per_s,
        "workers": STREAM_WORKERS,
    }
