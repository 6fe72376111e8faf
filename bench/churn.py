"""Experiment 4, a changing fleet: a backend joins a third of the way through a run and one of
the original backends leaves (SIGTERM) two thirds through, under steady Poisson load.

Slipstream needs nothing: the new worker starts pulling, the leaving one drains. nginx and
haproxy only learn of a change from their configuration, so the harness rewrites it and
reloads them; each arm's ``actions`` records exactly what the harness had to do.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.arms import Arm, available, make_arm
from bench.client import run_closed, run_trace
from bench.fleet import Backend, capacity_rps
from bench.result import Result
from bench.stats import summarize
from bench.trace import TraceRequest, TraceSpec, make_trace

START = [Backend("fast-1", 8, 100.0, 20.0), Backend("fast-2", 8, 100.0, 20.0)]
JOINER = Backend("fast-3", 8, 100.0, 20.0)
LEAVER = "fast-1"


async def _changes(arm: Arm, duration: float, log: list[dict[str, Any]]) -> None:
    t0 = time.perf_counter()
    await asyncio.sleep(duration / 3)
    log.append({"event": "join", "at_s": round(time.perf_counter() - t0, 2)})
    await arm.add_backend(JOINER)
    log[-1]["ready_s"] = round(time.perf_counter() - t0, 2)
    await asyncio.sleep(max(0.0, 2 * duration / 3 - (time.perf_counter() - t0)))
    log.append({"event": "leave", "at_s": round(time.perf_counter() - t0, 2)})
    await arm.remove_backend(LEAVER)
    log[-1]["gone_s"] = round(time.perf_counter() - t0, 2)


def _phases(results: list[Result], duration: float) -> dict[str, Any]:
    edges = {"before join": (0, duration / 3), "after join": (duration / 3, 2 * duration / 3)}
    edges["after leave"] = (2 * duration / 3, duration)
    out = {}
    for phase, (lo, hi) in edges.items():
        part = [r for r in results if lo <= r.at_s < hi]
        s = summarize(part, duration_s=hi - lo)
        out[phase] = {
            k: s[k]
            for k in (
                "requests",
                "ttft_p50_ms",
                "ttft_p99_ms",
                "goodput_pct",
                "outcomes",
                "by_backend",
            )
        }
    return out


def _timeline(results: list[Result]) -> list[list[Any]]:
    """[arrival s, TTFT ms or None, outcome, backend] per request (for the plot)."""
    return [
        [round(r.at_s, 3), None if r.ttft_ms is None else round(r.ttft_ms, 1), r.outcome, r.backend]
        for r in results
    ]


async def one_arm(name: str, plan: Any, trace: list[TraceRequest], workdir: Path) -> dict[str, Any]:
    log: list[dict[str, Any]] = []
    async with make_arm(
        name, START, workdir / "churn", queue_timeout_s=plan.queue_timeout_s
    ) as arm:
        warm = [TraceRequest(900_000 + i, 0.0, "warm-up", 8, "normal", 60_000) for i in range(16)]
        await run_closed(arm.target(), warm, concurrency=8)
        changes = asyncio.create_task(_changes(arm, plan.churn_duration_s, log))
        try:
            results = await run_trace(arm.target(), trace, timeout_s=plan.client_timeout_s)
            await changes
        finally:
            changes.cancel()
        await arm.attribute(results)
        actions = list(arm.actions)
    total = summarize(results, duration_s=plan.churn_duration_s)
    joined = sum(r.tokens for r in results if r.backend == JOINER.name and r.served)
    return {
        "actions": actions,
        "events": log,
        "summary": {
            k: total[k]
            for k in (
                "requests",
                "served",
                "outcomes",
                "ttft_p50_ms",
                "ttft_p99_ms",
                "goodput_pct",
                "errors",
            )
        },
        "joiner_share_pct": round(100 * joined / max(1, total["tokens"]), 2),
        "phases": _phases(results, plan.churn_duration_s),
        "timeline": _timeline(results),
    }


async def run_churn(plan: Any, workdir: Path) -> dict[str, Any]:
    rate = plan.churn_load * capacity_rps(START, plan.mean_tokens)
    spec = TraceSpec(
        rate_per_s=rate, duration_s=plan.churn_duration_s, mean_tokens=plan.mean_tokens
    )
    trace = make_trace(spec, plan.seed + 4242)
    out: dict[str, Any] = {
        "duration_s": plan.churn_duration_s,
        "load_of_start_fleet": plan.churn_load,
        "rate_per_s": round(rate, 3),
        "start": [b.name for b in START],
        "joiner": JOINER.name,
        "leaver": LEAVER,
        "arms": {},
    }
    for name in plan.churn_arms:
        if available(name):
            out["arms"][name] = await one_arm(name, plan, trace, workdir)
    return out
