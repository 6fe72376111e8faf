"""Experiment 5, warm state: a seeded multi-turn chat trace over simulated engines that keep a
prefix cache and charge prefill for every prompt token they do not hold. The trace is
``bench/warm_trace.py``, the client ``bench/warm_client.py``, the oracle
``bench/warm_oracle.py``; this module runs the arms and summarises them.

Conversations arrive as a Poisson process; each opens with one of a few long system prompts,
then runs 3-10 turns: a turn's messages are the previous turn's messages, the assistant's
answer as the client received it (leading whitespace stripped, as clients keep it) and a new
user message; the client thinks between turns. Every request carries ``X-Session-Id`` (the
conversation) and asks for ``stream_options.include_usage``, so the prefix-cache hit ratio is
read from ``usage.prompt_tokens_details.cached_tokens`` of each response, whichever balancer
served it. Every arm replays the same conversations, one arm after another.

The simulator's answers are deterministic (a function of the prompt), so the trace knows every
turn's prompt in advance: that gives the offered load exactly (the fleet's capacity with every
prompt token prefilled, i.e. no cache hit) and lets the harness check that each arm's client
really sent what the trace expects (``answers_mismatched``).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.arms import available, make_arm
from bench.fleet import Backend, warm_fleet
from bench.process import own_cpu_seconds
from bench.sse import http_json
from bench.stats import percentile
from bench.warm_client import TurnResult, replay
from bench.warm_oracle import simulate_oracle
from bench.warm_trace import Workload, make_workload

SLIPSTREAM_ARMS = {"slipstream-blind": False, "slipstream-warm": True}  # arm -> affinity on


# --- summaries -----------------------------------------------------------------------------
def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def summarize_turns(
    results: list[TurnResult], planned: int, duration_s: float, ttft_goal_ms: float
) -> dict[str, Any]:
    served = [r for r in results if r.served]
    first = [r.ttft_ms for r in served if r.turn == 0 and r.ttft_ms is not None]
    later = [r.ttft_ms for r in served if r.turn > 0 and r.ttft_ms is not None]
    every = first + later
    prompt = sum(r.prompt_tokens for r in served)
    cached = sum(r.cached_tokens for r in served)
    later_prompt = sum(r.prompt_tokens for r in served if r.turn > 0)
    later_cached = sum(r.cached_tokens for r in served if r.turn > 0)
    good = sum(1 for r in served if r.ttft_ms is not None and r.ttft_ms <= ttft_goal_ms)
    per_worker: dict[str, dict[str, int]] = {}
    for r in served:
        w = per_worker.setdefault(
            r.backend or "?", {"requests": 0, "prompt_tokens": 0, "uncached_tokens": 0, "tokens": 0}
        )
        w["requests"] += 1
        w["prompt_tokens"] += r.prompt_tokens
        w["uncached_tokens"] += r.prompt_tokens - r.cached_tokens
        w["tokens"] += r.tokens
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    return {
        "planned_turns": planned,
        "sent": len(results),
        "served": len(served),
        "outcomes": outcomes,
        "ttft_first_p50_ms": _r(percentile(first, 50)),
        "ttft_first_p99_ms": _r(percentile(first, 99)),
        "ttft_later_p50_ms": _r(percentile(later, 50)),
        "ttft_later_p99_ms": _r(percentile(later, 99)),
        "ttft_p50_ms": _r(percentile(every, 50)),
        "ttft_p99_ms": _r(percentile(every, 99)),
        "e2e_p50_ms": _r(percentile([r.e2e_ms for r in served if r.e2e_ms is not None], 50)),
        "hit_ratio_pct": _r(100 * cached / prompt if prompt else None, 2),
        "later_hit_ratio_pct": _r(100 * later_cached / later_prompt if later_prompt else None, 2),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "goodput_pct": _r(100 * good / planned if planned else None, 2),
        "goodput_turns_per_s": _r(good / duration_s if duration_s else None, 3),
        "per_worker": dict(sorted(per_worker.items())),
        "answers_mismatched": sum(1 for r in served if not r.answer_ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def affinity_summary(results: list[TurnResult], wait_ms: float) -> dict[str, Any]:
    rows = [r.affinity for r in results if r.affinity]
    if not rows:
        return {"jobs": 0, "reported": False}
    waits = [float(a.get("wait_ms") or 0) for a in rows]
    outcomes: dict[str, int] = {}
    for a in rows:
        key = str(a.get("outcome"))
        outcomes[key] = outcomes.get(key, 0) + 1
    honoured = sum(1 for a in rows if a.get("target") and a.get("worker") == a.get("target"))
    targeted = sum(1 for a in rows if a.get("target"))
    return {
        "jobs": len(rows),
        "reported": True,
        "outcomes": outcomes,
        "targeted": targeted,
        "ran_on_target": honoured,
        "wait_p50_ms": _r(percentile(waits, 50)),
        "wait_p99_ms": _r(percentile(waits, 99)),
        "wait_max_ms": _r(max(waits)),
        "configured_wait_ms": wait_ms,
        "over_wait": sum(1 for w in waits if w > wait_ms),
    }


# --- the experiment ------------------------------------------------------------------------
def _sample(results: list[TurnResult], later: bool) -> list[float]:
    return sorted(
        round(r.ttft_ms, 1)
        for r in results
        if r.served and r.ttft_ms is not None and (r.turn > 0) == later
    )


async def _job_affinity(base_url: str, results: list[TurnResult]) -> None:
    sem = asyncio.Semaphore(16)

    async def one(r: TurnResult) -> None:
        async with sem:
            status, body = await http_json(f"{base_url}/v1/jobs/{r.job_id}", timeout=10.0)
        if status == 200 and isinstance(body, dict) and isinstance(body.get("affinity"), dict):
            r.affinity = body["affinity"]

    await asyncio.gather(*(one(r) for r in results if r.job_id))


async def _run_arm(
    name: str, plan: Any, fleet: list[Backend], work: Workload, workdir: Path
) -> dict[str, Any]:
    options: dict[str, Any] = {"queue_timeout_s": plan.queue_timeout_s}
    base = name
    if name in SLIPSTREAM_ARMS:
        base = "slipstream"
        env = {"SLIPSTREAM_AFFINITY": "true" if SLIPSTREAM_ARMS[name] else "false"}
        env["SLIPSTREAM_AFFINITY_WAIT_MS"] = str(plan.warm_affinity_wait_ms)
        options["gateway_env"] = env
    async with make_arm(base, fleet, workdir / "warm" / name, **options) as arm:
        arm.group.mark_cpu()
        client_cpu, started = own_cpu_seconds(), time.perf_counter()
        results = await replay(arm.target().base_url, work.conversations, plan.client_timeout_s)
        wall = time.perf_counter() - started
        cpu = arm.group.cpu_since_mark() | {"client": round(own_cpu_seconds() - client_cpu, 3)}
        await arm.attribute(results)  # type: ignore[arg-type]
        if name in SLIPSTREAM_ARMS:
            await _job_affinity(arm.target().base_url, results)
    return _summary(results, plan, work) | {
        "cpu_s": cpu,
        "wall_s": round(wall, 1),
        "affinity": affinity_summary(results, plan.warm_affinity_wait_ms),
    }


def _summary(results: list[TurnResult], plan: Any, work: Workload) -> dict[str, Any]:
    planned = sum(len(c.users) for c in work.conversations)
    return summarize_turns(results, planned, work.spec.duration_s, plan.warm_ttft_goal_ms) | {
        "ttft_samples": {"first": _sample(results, False), "later": _sample(results, True)},
        "slowest_later": _slowest(results),
    }


def _slowest(results: list[TurnResult], n: int = 12) -> list[dict[str, Any]]:
    """The later turns with the longest TTFT: where each ran and what it found cached."""
    later = [r for r in results if r.served and r.turn > 0 and r.ttft_ms is not None]
    later.sort(key=lambda r: -(r.ttft_ms or 0))
    return [
        {
            "conv": r.conv,
            "turn": r.turn,
            "at_s": r.at_s,
            "ttft_ms": round(r.ttft_ms or 0, 1),
            "backend": r.backend,
            "prompt_tokens": r.prompt_tokens,
            "cached_tokens": r.cached_tokens,
            "affinity": r.affinity,
        }
        for r in later[:n]
    ]


def arms_of(plan: Any) -> list[str]:
    out = []
    for name in plan.warm_arms:
        base = "slipstream" if name in SLIPSTREAM_ARMS else name
        if available(base):
            out.append(name)
    return out


async def run_warm(plan: Any, workdir: Path) -> dict[str, Any]:
    fleet = warm_fleet(plan.warm_cache_tokens)
    work = make_workload(
        fleet,
        plan.warm_load,
        plan.warm_duration_s,
        plan.seed,
        system_tokens=plan.warm_system_tokens,
        answer_tokens=plan.warm_answer_tokens,
        think_mean_s=plan.warm_think_mean_s,
    )
    out: dict[str, Any] = {
        "fleet": [
            {
                "name": b.name,
                "slots": b.slots,
                "tokens_per_s": b.tokens_per_s,
                "ttft_ms": b.ttft_ms,
                "prefill_tokens_per_s": b.prefill_tokens_per_s,
                "cache_tokens": b.cache_tokens,
            }
            for b in fleet
        ],
        "load": plan.warm_load,
        "trace": work.describe(),
        "ttft_goal_ms": plan.warm_ttft_goal_ms,
        "affinity_wait_ms": plan.warm_affinity_wait_ms,
        "arms": {"oracle-warm": _summary(simulate_oracle(work.conversations, fleet), plan, work)},
    }
    for name in arms_of(plan):
        print(f"[bench] warm: {name} ...", flush=True)
        try:
            out["arms"][name] = await _run_arm(name, plan, fleet, work, workdir)
        except Exception as exc:  # one arm's failure is recorded; the others still run
            out["arms"][name] = {"failed": f"{type(exc).__name__}: {exc}"[:2000]}
        await asyncio.sleep(0.5)
    return out
