"""The plans (``smoke``, ``quick``, ``full``) and the runner that executes the experiments of a
plan and writes the raw results as JSON."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.machine import describe

EXPERIMENTS = ("overhead", "balance", "streams", "fleet", "warm")


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str
    reps: int = 3
    seed: int = 1
    pin: bool = True
    coalesce_ms: float = 5.0
    client_timeout_s: float = 60.0
    queue_timeout_s: float = 10.0  # haproxy's queue timeout
    mean_tokens: float = 128.0  # mean output length of the balance and fleet traces
    # 1. overhead
    overhead_arms: tuple[str, ...] = ("direct", "nginx-rr", "haproxy", "slipstream")
    overhead_requests: int = 200
    overhead_warmup: int = 30
    overhead_tokens: int = 8
    relay_seconds: float = 8.0
    relay_streams: int = 32
    relay_stream_tps: float = 1000.0  # simulator speed per stream in the relay test
    relay_tokens: int = 2000
    # 2. balance
    balance_arms: tuple[str, ...] = ("nginx-rr", "nginx-lc", "haproxy", "slipstream")
    loads: tuple[float, ...] = (0.7, 0.85, 1.1)
    key_load: float = 0.85
    other_reps: int = 1
    balance_duration_s: float = 10.0
    # 3. streams
    stream_counts: tuple[int, ...] = (1000, 2000)
    stream_ramp_per_s: float = 400.0
    stream_hold_s: float = 6.0
    stream_ping_s: float = 5.0
    stream_sample: int = 200
    # 4. fleet changes
    churn_arms: tuple[str, ...] = ("slipstream", "nginx-lc", "haproxy")
    churn_duration_s: float = 21.0
    churn_load: float = 0.9
    # 5. warm state (multi-turn chat, prefix caches)
    warm_arms: tuple[str, ...] = (
        "slipstream-blind",
        "slipstream-warm",
        "nginx-rr",
        "haproxy",
        "nginx-hash",
    )
    warm_load: float = 0.85  # of the fleet's capacity with every prompt token prefilled
    warm_duration_s: float = 30.0  # conversation arrivals; the last ones run on after it
    warm_cache_tokens: int = 32768  # each simulated engine's prefix cache
    warm_system_tokens: int = 1000
    warm_answer_tokens: tuple[int, int] = (20, 170)
    warm_think_mean_s: float = 2.0
    warm_ttft_goal_ms: float = 1000.0  # goodput: turns served with a first token within this
    warm_affinity_wait_ms: int = 250  # SLIPSTREAM_AFFINITY_WAIT_MS of the warm-aware arm

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PLANS = {
    "smoke": Plan(
        mode="smoke",
        reps=1,
        pin=False,
        overhead_arms=("direct", "slipstream"),
        overhead_requests=10,
        overhead_warmup=2,
        relay_seconds=0.0,
        mean_tokens=16.0,
        balance_arms=("slipstream",),
        loads=(0.3,),
        key_load=0.3,
        balance_duration_s=1.5,
        stream_counts=(20,),
        stream_ramp_per_s=200.0,
        stream_hold_s=2.0,
        stream_ping_s=1.0,
        stream_sample=5,
        churn_arms=("slipstream",),
        churn_duration_s=4.5,
        churn_load=0.3,
        warm_arms=("slipstream-warm",),
        warm_load=0.3,
        warm_duration_s=2.0,
        warm_system_tokens=300,
        warm_answer_tokens=(4, 12),
        warm_think_mean_s=0.2,
    ),
    "quick": Plan(mode="quick"),
    "full": Plan(
        mode="full",
        reps=3,
        overhead_requests=2000,
        overhead_warmup=100,
        relay_seconds=20.0,
        loads=(0.5, 0.7, 0.85, 0.95, 1.1),
        other_reps=3,
        balance_duration_s=60.0,
        stream_counts=(1000, 2000, 5000, 10000),
        stream_ramp_per_s=500.0,
        stream_hold_s=20.0,
        churn_arms=("slipstream", "nginx-rr", "nginx-lc", "haproxy"),
        churn_duration_s=60.0,
        warm_duration_s=150.0,
    ),
}


def plan_for(mode: str, *, reps: int | None = None, seed: int | None = None) -> Plan:
    plan = PLANS[mode]
    changes: dict[str, Any] = {}
    if reps is not None:
        changes["reps"] = reps
    if seed is not None:
        changes["seed"] = seed
    return dataclasses.replace(plan, **changes)


async def run_plan(
    plan: Plan, only: tuple[str, ...], workdir: Path | None = None
) -> dict[str, Any]:
    """Run the chosen experiments; a failing experiment is recorded, the others still run."""
    from bench.arms import skipped_arms
    from bench.balance import run_balance
    from bench.churn import run_churn
    from bench.multiturn import run_warm
    from bench.overhead import run_overhead
    from bench.streams import run_streams

    runners = {
        "overhead": run_overhead,
        "balance": run_balance,
        "streams": run_streams,
        "fleet": run_churn,
        "warm": run_warm,
    }
    work = workdir or Path(tempfile.mkdtemp(prefix="slip-bench-"))
    out: dict[str, Any] = {"plan": plan.describe(), "machine": describe(), "seconds": {}}
    out["skipped_arms"] = skipped_arms()
    for why in out["skipped_arms"].values():
        print(f"[bench] {why}", flush=True)
    for name in EXPERIMENTS:
        if name not in only:
            continue
        started = time.monotonic()
        print(f"[bench] {name} ...", flush=True)
        try:
            out[name] = await runners[name](plan, work)
        except Exception as exc:  # recorded in the results, so one failure does not hide the rest
            out[name] = {"failed": f"{type(exc).__name__}: {exc}"[:2000]}
            print(f"[bench] {name} failed: {exc}", flush=True)
        out["seconds"][name] = round(time.monotonic() - started, 1)
        print(f"[bench] {name} done in {out['seconds'][name]} s", flush=True)
    out["workdir"] = str(work)
    return out


def save(results: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = directory / f"{results['plan']['mode']}-{stamp}.json"
    path.write_text(json.dumps(results, indent=1))
    (directory / f"{results['plan']['mode']}-latest.json").write_text(json.dumps(results, indent=1))
    return path
