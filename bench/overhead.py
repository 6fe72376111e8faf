"""Experiment 1, overhead: an instant simulated model behind each arm.

- Added time to first token: one request at a time (no queueing anywhere), ``max_tokens``
  small, TTFT of each arm minus the direct arm's, at p50 and p99.
- Relay ceiling: many concurrent long streams from a worker that generates as fast as it can
  (tokens coalesced worker-side), the tokens/s the client receives through one gateway
  process, and the gateway's CPU µs per token (hence what one core of it would relay).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.arms import SlipstreamArm, available, make_arm
from bench.client import Target, one_request, run_closed
from bench.fleet import Backend
from bench.process import cpu_count, own_cpu_seconds
from bench.result import Result
from bench.stats import combine, percentile, summarize
from bench.trace import TraceRequest

INSTANT = Backend("instant", slots=256, tokens_per_s=1_000_000.0, ttft_ms=0.0)


@contextlib.contextmanager
def pinned(pin: bool) -> Iterator[frozenset[int] | None]:
    """Pin the load generator to CPU 0 and yield the CPUs for the arm's processes (1..)."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        yield None
        return
    os.sched_setaffinity(0, {cpus[0]})
    try:
        yield frozenset(cpus[1:])
    finally:
        os.sched_setaffinity(0, set(cpus))


BASELINE = "slipstream-before"


def _baseline_arm(tree: str, workdir: Path, cpus: frozenset[int] | None) -> Any:
    """``BENCH_BASELINE_TREE=<a checkout>``: one more Slipstream arm whose gateway and worker
    run that tree's code (``PYTHONPATH``), beside this tree's, in the same run and interleaved
    with it: a before/after, same machine, same minutes."""
    arm = make_arm("slipstream", [INSTANT], workdir / "overhead-before", cpus=cpus)
    assert isinstance(arm, SlipstreamArm)
    arm.gateway_env = {"PYTHONPATH": tree}
    arm.worker_env = {"PYTHONPATH": tree}
    arm.name = BASELINE
    return arm


def requests(n: int, tokens: int, *, offset: int = 0) -> list[TraceRequest]:
    return [
        TraceRequest(offset + i, 0.0, f"overhead probe {i}", tokens, "normal", 60_000)
        for i in range(n)
    ]


async def _one_rep(target: Target, plan: Any, rep: int) -> dict[str, Any]:
    trace = requests(plan.overhead_requests, plan.overhead_tokens, offset=rep * 100_000)
    summary = summarize(await run_closed(target, trace, concurrency=1), duration_s=1.0)
    keys = ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "served", "requests")
    return {k: summary[k] for k in keys}


async def ttft_overhead(plan: Any, workdir: Path) -> dict[str, Any]:
    """All arms run at once; repetitions are interleaved (rep 1 of every arm, then rep 2...)
    so that drift in the machine's background load hits every arm alike."""
    names = [a for a in plan.overhead_arms if available(a)]
    out: dict[str, Any] = {"arms": {}, "pinned": False, "interleaved": True}
    reps: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with pinned(plan.pin) as cpus:
        out["pinned"] = cpus is not None
        out["cpus"] = {"client": sorted(os.sched_getaffinity(0)), "servers": sorted(cpus or [])}
        async with contextlib.AsyncExitStack() as stack:
            arms = {}
            for name in names:
                arm = make_arm(name, [INSTANT], workdir / "overhead", cpus=cpus)
                arms[name] = await stack.enter_async_context(arm)
            if baseline := os.environ.get("BENCH_BASELINE_TREE"):
                arm = _baseline_arm(baseline, workdir, cpus)
                arms[BASELINE] = await stack.enter_async_context(arm)
                reps[BASELINE] = []
                out["baseline_tree"] = baseline
            for arm in arms.values():
                await run_closed(arm.target(), requests(plan.overhead_warmup, plan.overhead_tokens))
            for rep in range(plan.reps):
                for name, arm in arms.items():
                    reps[name].append(await _one_rep(arm.target(), plan, rep))
    for name in reps:  # the baseline arm (if any) too
        out["arms"][name] = combine(reps[name]) | {"per_rep": reps[name]}
    direct = out["arms"].get("direct")
    for name, row in out["arms"].items():
        if direct is not None and name != "direct":
            for q in ("p50", "p99"):
                added = [
                    r[f"ttft_{q}_ms"] - d[f"ttft_{q}_ms"]
                    for r, d in zip(row["per_rep"], direct["per_rep"], strict=False)
                ]
                row[f"added_{q}_ms"] = round(sorted(added)[len(added) // 2], 3)
                row[f"added_{q}_ms_min"] = round(min(added), 3)
                row[f"added_{q}_ms_max"] = round(max(added), 3)
    return out


async def _pump(target: Target, seconds: float, concurrency: int, tokens: int) -> list[Result]:
    """Closed loop: ``concurrency`` streams back to back for ``seconds``."""
    t0 = time.perf_counter()
    end = t0 + seconds
    results: list[Result] = []

    async def loop(k: int) -> None:
        i = 0
        while time.perf_counter() < end:
            req = TraceRequest(k * 1_000_000 + i, 0.0, f"relay {k} {i}", tokens, "normal", 600_000)
            results.append(await one_request(target, req, t0, timeout_s=seconds + 60))
            i += 1

    await asyncio.gather(*(loop(k) for k in range(concurrency)))
    return results


async def relay_ceiling(plan: Any, workdir: Path) -> dict[str, Any]:
    """Tokens/s through one gateway, and its CPU per token (Slipstream; direct for scale)."""
    out: dict[str, Any] = {}
    fleet = [
        Backend("relay", slots=plan.relay_streams, tokens_per_s=plan.relay_stream_tps, ttft_ms=0.0)
    ]
    for name in ("direct", "slipstream"):
        arm_env = {"worker_env": {"SLIPSTREAM_COALESCE_MS": str(plan.coalesce_ms)}}
        async with make_arm(name, fleet, workdir / "relay", **arm_env) as arm:
            await _pump(arm.target(), 1.0, 4, 200)  # warm-up
            arm.group.mark_cpu()
            client_cpu = own_cpu_seconds()
            started = time.perf_counter()
            results = await _pump(
                arm.target(), plan.relay_seconds, plan.relay_streams, plan.relay_tokens
            )
            elapsed = time.perf_counter() - started
            cpu = arm.group.cpu_since_mark()
            cpu["client"] = round(own_cpu_seconds() - client_cpu, 3)
        tokens = sum(r.tokens for r in results)
        row: dict[str, Any] = {
            "tokens": tokens,
            "seconds": round(elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 1),
            "requests": len(results),
            "served": sum(1 for r in results if r.served),
            "cpu_s": cpu,
            "cpu_us_per_token": {k: round(v * 1e6 / tokens, 2) for k, v in cpu.items() if tokens},
        }
        gw = row["cpu_us_per_token"].get("gateway")
        if gw:
            row["gateway_core_ceiling_tps"] = round(1e6 / gw)
        itl = [g for r in results for g in r.itl_ms]
        reads = sum(1 for g in itl if g > 0) + sum(1 for r in results if r.ttft_ms is not None)
        row["tokens_per_read"] = round(tokens / max(1, reads), 3)
        row["itl_p99_ms"] = percentile(itl, 99)
        out[name] = row
    out["cores"] = cpu_count()
    return out


async def run_overhead(plan: Any, workdir: Path) -> dict[str, Any]:
    out = {"ttft": await ttft_overhead(plan, workdir)}
    if plan.relay_seconds > 0:
        out["relay"] = await relay_ceiling(plan, workdir)
    return out
