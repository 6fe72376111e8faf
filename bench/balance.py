"""Experiment 2, balancing quality: three backends (8 slots each; two at 10 ms/token, one 2x
slower), log-normal output lengths, Poisson load at fractions of the fleet's capacity; every
balancer arm and the oracle replay the identical trace at each load point."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.arms import Arm, available, make_arm
from bench.client import run_closed, run_trace
from bench.fleet import Backend, balance_fleet, capacity_rps, capacity_tps
from bench.oracle import simulate
from bench.process import own_cpu_seconds
from bench.result import Result
from bench.stats import combine, summarize
from bench.trace import TraceRequest, TraceSpec, make_trace


def trace_spec(plan: Any, load: float, fleet: list[Backend]) -> TraceSpec:
    rate = load * capacity_rps(fleet, plan.mean_tokens)
    return TraceSpec(
        rate_per_s=rate, duration_s=plan.balance_duration_s, mean_tokens=plan.mean_tokens
    )


def points(plan: Any) -> list[tuple[float, int]]:
    """(load, repetition) pairs: every load once, the key load ``plan.reps`` times."""
    out: list[tuple[float, int]] = []
    for load in plan.loads:
        reps = plan.reps if load == plan.key_load else plan.other_reps
        out += [(load, rep) for rep in range(reps)]
    return out


def traces(plan: Any, fleet: list[Backend]) -> dict[tuple[float, int], list[TraceRequest]]:
    return {
        (load, rep): make_trace(
            trace_spec(plan, load, fleet), plan.seed + 7919 * rep + int(load * 1000)
        )
        for load, rep in points(plan)
    }


def _slow(fleet: list[Backend]) -> list[str]:
    fastest = max(b.tokens_per_s for b in fleet)
    return [b.name for b in fleet if b.tokens_per_s < fastest]


def ttft_sample(results: list[Result]) -> list[float]:
    """Sorted TTFTs of served requests (rounded), kept for the CDF plot."""
    return sorted(round(r.ttft_ms, 1) for r in results if r.served and r.ttft_ms is not None)


async def _warm_up(arm: Arm) -> None:
    warm = [TraceRequest(900_000 + i, 0.0, f"warm-up {i}", 16, "normal", 60_000) for i in range(24)]
    await run_closed(arm.target(), warm, concurrency=8, timeout_s=30)


async def _run_arm(
    name: str,
    plan: Any,
    fleet: list[Backend],
    all_traces: dict[tuple[float, int], list[TraceRequest]],
    workdir: Path,
) -> dict[str, Any]:
    runs: dict[float, list[dict[str, Any]]] = {}
    samples: dict[str, list[float]] = {}
    async with make_arm(
        name, fleet, workdir / "balance", queue_timeout_s=plan.queue_timeout_s
    ) as arm:
        await _warm_up(arm)
        for (load, rep), trace in all_traces.items():
            arm.group.mark_cpu()
            client_cpu, started = own_cpu_seconds(), time.perf_counter()
            results = await run_trace(arm.target(), trace, timeout_s=plan.client_timeout_s)
            wall = time.perf_counter() - started
            cpu = arm.group.cpu_since_mark() | {"client": round(own_cpu_seconds() - client_cpu, 3)}
            await arm.attribute(results)
            summary = summarize(results, duration_s=plan.balance_duration_s, slow=_slow(fleet))
            runs.setdefault(load, []).append(summary | {"cpu_s": cpu, "wall_s": round(wall, 1)})
            if load == plan.key_load and rep == 0:
                samples[str(load)] = ttft_sample(results)
            await asyncio.sleep(0.5)
    return {
        "loads": {str(load): combine(reps) | {"per_rep": reps} for load, reps in runs.items()},
        "ttft_samples": samples,
    }


def _oracle(
    plan: Any, fleet: list[Backend], all_traces: dict[tuple[float, int], list[TraceRequest]]
) -> dict[str, Any]:
    runs: dict[float, list[dict[str, Any]]] = {}
    samples: dict[str, list[float]] = {}
    for (load, rep), trace in all_traces.items():
        results = simulate(trace, fleet)
        runs.setdefault(load, []).append(
            summarize(results, duration_s=plan.balance_duration_s, slow=_slow(fleet))
        )
        if load == plan.key_load and rep == 0:
            samples[str(load)] = ttft_sample(results)
    return {
        "loads": {str(load): combine(reps) | {"per_rep": reps} for load, reps in runs.items()},
        "ttft_samples": samples,
    }


async def run_balance(plan: Any, workdir: Path) -> dict[str, Any]:
    fleet = balance_fleet()
    all_traces = traces(plan, fleet)
    spec = trace_spec(plan, 1.0, fleet)
    out: dict[str, Any] = {
        "fleet": [vars_of(b) for b in fleet],
        "capacity_rps": round(capacity_rps(fleet, spec.mean_tokens), 3),
        "capacity_tps": capacity_tps(fleet),
        "duration_s": plan.balance_duration_s,
        "loads": list(plan.loads),
        "key_load": plan.key_load,
        "trace": {
            "mean_tokens": spec.mean_tokens,
            "tokens_sigma": spec.tokens_sigma,
            "deadline": f"{spec.deadline_base_ms:.0f} ms + "
            f"{spec.deadline_per_token_ms:.0f} ms x max_tokens",
            "priorities": dict(spec.priorities),
            "requests": {f"{k[0]}#{k[1]}": len(v) for k, v in all_traces.items()},
        },
        "arms": {"oracle": _oracle(plan, fleet, all_traces)},
    }
    for name in plan.balance_arms:
        if available(name):
            out["arms"][name] = await _run_arm(name, plan, fleet, all_traces, workdir)
    return out


def vars_of(b: Backend) -> dict[str, Any]:
    return {"name": b.name, "slots": b.slots, "tokens_per_s": b.tokens_per_s, "ttft_ms": b.ttft_ms}
