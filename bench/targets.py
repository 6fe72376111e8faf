"""The issue's targets, checked against a results dict: the headline table."""

from __future__ import annotations

from typing import Any

Row = tuple[str, str, str, str]


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**no**")


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _skipped(results: dict[str, Any], arm: str) -> str | None:
    """Why ``arm`` did not run ("arm skipped: nginx not installed"), or None: a comparison
    with a missing arm is a row saying so, never a row that silently vanishes."""
    why = (results.get("skipped_arms") or {}).get(arm)
    return str(why) if why else None


def overhead_rows(results: dict[str, Any]) -> list[Row]:
    arms = _get(results, "overhead", "ttft", "arms") or {}
    slip, nginx = arms.get("slipstream", {}), arms.get("nginx-rr", {})
    rows: list[Row] = []
    for q, target in (("p50", 1.5), ("p99", 4.0)):  # issue 15
        value = slip.get(f"added_{q}_ms")
        other = nginx.get(f"added_{q}_ms")
        measured = "-" if value is None else f"{value:.2f} ms"
        if other is not None:
            measured += f" (nginx: {other:.2f} ms)"
        elif why := _skipped(results, "nginx-rr"):
            measured += f" (nginx: {why})"
        before = arms.get("slipstream-before", {}).get(f"added_{q}_ms")
        if before is not None:  # BENCH_BASELINE_TREE: the code before, in the same run
            measured += f"; before: {before:.2f} ms"
        ok = None if value is None else value <= target
        rows.append((f"Added TTFT {q} over direct", f"≤ {target} ms", measured, _verdict(ok)))
    relay = _get(results, "overhead", "relay", "slipstream")
    if relay:
        tps, ceiling = relay["tokens_per_s"], relay.get("gateway_core_ceiling_tps") or 0
        gw = relay["cpu_us_per_token"].get("gateway")
        measured = f"{tps:,.0f} delivered here; {ceiling:,.0f} at one full core ({gw} µs/token)"
        rows.append(
            (
                "Tokens/s through one gateway process",
                "≥ 25,000",
                measured,
                _verdict(max(tps, ceiling) >= 25_000),
            )
        )
    return rows


def balance_rows(results: dict[str, Any]) -> list[Row]:
    section = results.get("balance") or {}
    key = str(section.get("key_load"))
    arms = section.get("arms") or {}

    def at(name: str, field: str) -> float | None:
        value = _get(arms, name, "loads", key, field)
        return value if isinstance(value, int | float) else None

    slip, rr, ha = (
        at("slipstream", "ttft_p99_ms"),
        at("nginx-rr", "ttft_p99_ms"),
        at("haproxy", "ttft_p99_ms"),
    )
    rows: list[Row] = []
    for arm, label, factor, other in (
        ("nginx-rr", "nginx round-robin", 0.5, rr),
        ("haproxy", "haproxy leastconn", 1.0, ha),
    ):
        what, target = f"p99 TTFT at load {key} vs {label}", f"≤ {factor:g}x"
        if slip is not None and other is not None:
            measured = f"{slip:.0f} vs {other:.0f} ms ({slip / other:.2f}x)"
            rows.append((what, target, measured, _verdict(slip <= factor * other)))
        elif slip is not None and (why := _skipped(results, arm)):
            rows.append((what, target, why, "-"))
    good, oracle = at("slipstream", "goodput_pct"), at("oracle", "goodput_pct")
    if good is not None and oracle:
        rows.append(
            (
                f"Goodput at load {key} vs oracle",
                "≥ 90%",
                f"{good:.1f}% vs {oracle:.1f}% ({100 * good / oracle:.0f}%)",
                _verdict(good >= 0.9 * oracle),
            )
        )
    return rows


def streams_rows(results: dict[str, Any]) -> list[Row]:
    rows_in = [r for r in _get(results, "streams", "rows") or [] if "failed" not in r]
    if not rows_in:
        return []
    top = max(rows_in, key=lambda r: r["streams"])
    kb, p99 = top["kb_per_stream"], top["delivery_p99_ms"]
    tried_10k = top["streams"] >= 10_000
    size_ok = kb <= 30 and (top["opened"] >= 10_000 if tried_10k else None)
    size_verdict = _verdict(size_ok) if tried_10k or kb > 30 else "not tried (quick mode)"
    rows: list[Row] = [
        (
            "Streams in one gateway process",
            "≥ 10,000 at ≤ 30 KB each",
            f"{top['opened']:.0f} open at {kb:.1f} KB each",
            size_verdict,
        ),
    ]
    if p99 is not None:
        rows.append(
            (
                f"Delivery p99 at {top['streams']} streams",
                "< 100 ms",
                f"{p99:.1f} ms",
                _verdict(p99 < 100),
            )
        )
    per_event = top.get("gateway_us_per_event")
    if per_event is not None:
        pinned = "gateway pinned" if top.get("gateway_pinned") else "unpinned"
        rows.append(
            (
                f"Gateway CPU per relayed event at {top['streams']} streams",
                "≤ 50 µs",
                f"{per_event:.1f} µs ({pinned})",
                _verdict(per_event <= 50),
            )
        )
    return rows


def fleet_rows(results: dict[str, Any]) -> list[Row]:
    slip = _get(results, "fleet", "arms", "slipstream")
    if not slip:
        return []
    errors = slip["summary"]["outcomes"]["error"]
    share = slip["joiner_share_pct"]
    measured = f"{'; '.join(slip['actions'])}; {errors} errors; {share:.0f}% of work on the new one"
    return [
        (
            "Join + leave mid-run, Slipstream",
            "no reconfiguration, no errors",
            measured,
            _verdict(errors == 0),
        )
    ]


def headline(results: dict[str, Any]) -> list[Row]:
    return (
        overhead_rows(results) + balance_rows(results) + streams_rows(results) + fleet_rows(results)
    )


def warm_rows(results: dict[str, Any]) -> list[Row]:
    """Issue 11's targets at the warm experiment's load (warm-aware vs the other arms)."""
    section = results.get("warm") or {}
    arms = section.get("arms") or {}
    load = section.get("load")

    def at(name: str, field: str) -> float | None:
        value = _get(arms, name, field)
        return value if isinstance(value, int | float) else None

    rows: list[Row] = []
    warm_p50, blind_p50 = (
        at("slipstream-warm", "ttft_later_p50_ms"),
        at("slipstream-blind", "ttft_later_p50_ms"),
    )
    if warm_p50 is not None and blind_p50 is not None:
        rows.append(
            (
                f"Later-turn TTFT p50 at load {load} vs Slipstream cache-blind",
                "≥ 3x lower",
                f"{warm_p50:.1f} vs {blind_p50:.1f} ms ({blind_p50 / warm_p50:.2f}x lower)",
                _verdict(warm_p50 * 3 <= blind_p50),
            )
        )
    hit, sticky_hit = at("slipstream-warm", "hit_ratio_pct"), at("nginx-hash", "hit_ratio_pct")
    if hit is not None and sticky_hit:
        rows.append(
            (
                "Hit ratio vs sticky hashing",
                "≥ 90%",
                f"{hit:.1f}% vs {sticky_hit:.1f}% ({100 * hit / sticky_hit:.0f}%)",
                _verdict(hit >= 0.9 * sticky_hit),
            )
        )
    p99, sticky_p99 = at("slipstream-warm", "ttft_p99_ms"), at("nginx-hash", "ttft_p99_ms")
    if p99 is not None and sticky_p99:
        rows.append(
            (
                "TTFT p99 (all turns) vs sticky hashing",
                "≤ 0.5x",
                f"{p99:.0f} vs {sticky_p99:.0f} ms ({p99 / sticky_p99:.2f}x)",
                _verdict(p99 <= 0.5 * sticky_p99),
            )
        )
    blind_p99 = at("slipstream-blind", "ttft_p99_ms")
    if p99 is not None and blind_p99:
        rows.append(
            (
                "TTFT p99 (all turns) vs Slipstream cache-blind",
                "≤ 1x",
                f"{p99:.0f} vs {blind_p99:.0f} ms ({p99 / blind_p99:.2f}x)",
                _verdict(p99 <= blind_p99),
            )
        )
    aff = _get(arms, "slipstream-warm", "affinity") or {}
    if aff.get("reported"):
        rows.append(
            (
                "Longest affinity wait (job API, every job)",
                f"≤ {aff['configured_wait_ms']} ms",
                f"{aff['wait_max_ms']:.0f} ms max, p99 {aff['wait_p99_ms']:.0f} ms; "
                f"{aff['over_wait']} of {aff['jobs']} jobs over",
                _verdict(aff["over_wait"] == 0),
            )
        )
    elif "slipstream-warm" in arms:
        rows.append(
            (
                "Longest affinity wait (job API, every job)",
                f"≤ {section.get('affinity_wait_ms')} ms",
                "not reported by the job API",
                "-",
            )
        )
    return rows
