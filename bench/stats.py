"""Summaries: percentiles of one run, and medians with spread over repetitions."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from bench.result import OUTCOMES, TTFT_GOAL_MS, Result


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _r(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def summarize(
    results: list[Result],
    *,
    duration_s: float,
    slow: Iterable[str] = (),
    ttft_goal_ms: float = TTFT_GOAL_MS,
) -> dict[str, Any]:
    """One run: latency percentiles over served requests, outcomes, goodput, slow share."""
    served = [r for r in results if r.served]
    ttft = [r.ttft_ms for r in served if r.ttft_ms is not None]
    e2e = [r.e2e_ms for r in served if r.e2e_ms is not None]
    itl = [g for r in served for g in r.itl_ms]
    good = sum(1 for r in results if r.good(ttft_goal_ms))
    tokens = sum(r.tokens for r in served)
    slow_names = set(slow)
    slow_tokens = sum(r.tokens for r in served if r.backend in slow_names)
    outcomes = {o: sum(1 for r in results if r.outcome == o) for o in OUTCOMES}
    errors = sorted({r.error for r in results if r.error})[:5]
    return {
        "requests": len(results),
        "served": len(served),
        "outcomes": outcomes,
        "ttft_p50_ms": _r(percentile(ttft, 50)),
        "ttft_p99_ms": _r(percentile(ttft, 99)),
        "e2e_p50_ms": _r(percentile(e2e, 50)),
        "e2e_p99_ms": _r(percentile(e2e, 99)),
        "itl_p50_ms": _r(percentile(itl, 50), 3),
        "itl_p99_ms": _r(percentile(itl, 99), 3),
        "goodput_pct": _r(100 * good / len(results) if results else None),
        "goodput_rps": _r(good / duration_s if duration_s else None, 3),
        "tokens": tokens,
        "tokens_per_s": _r(tokens / duration_s if duration_s else None, 1),
        "slow_share_pct": _r(100 * slow_tokens / tokens if tokens and slow_names else None),
        "by_backend": _by_backend(served),
        "errors": errors,
    }


def _by_backend(served: list[Result]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in served:
        key = r.backend or "?"
        counts[key] = counts.get(key, 0) + r.tokens
    return dict(sorted(counts.items()))


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each numeric figure over repetitions, with ``<name>_min``/``_max`` (spread)."""
    if len(runs) == 1:
        return {**runs[0], "reps": 1}
    out: dict[str, Any] = {"reps": len(runs)}
    for key, first in runs[0].items():
        values = [run.get(key) for run in runs]
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if isinstance(first, int | float) and numbers:
            out[key] = _r(statistics.median(numbers), 3)
            out[f"{key}_min"], out[f"{key}_max"] = min(numbers), max(numbers)
        elif isinstance(first, dict) and all(isinstance(v, dict) for v in values):
            out[key] = {k: sum(v.get(k, 0) for v in values) for k in first}
        else:
            out[key] = first
    return out


def spread(summary: dict[str, Any], key: str, digits: int = 1) -> str:
    """``median (min-max)`` when repeated, else the value; ``-`` when missing."""
    value = summary.get(key)
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    low, high = summary.get(f"{key}_min"), summary.get(f"{key}_max")
    if low is not None and high is not None and summary.get("reps", 1) > 1:
        text += f" ({low:.{digits}f}-{high:.{digits}f})"
    return text
