"""The PNG plots next to docs/benchmarks.md (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.arms import LABELS

COLORS = {
    "oracle": "#444444",
    "direct": "#8c8c8c",
    "nginx-rr": "#e15759",
    "nginx-lc": "#f28e2b",
    "haproxy": "#4e79a7",
    "slipstream": "#59a14f",
    "nginx-hash": "#b07aa1",
    "slipstream-blind": "#9c755f",
    "slipstream-warm": "#59a14f",
    "oracle-warm": "#444444",
}


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overhead_png(results: dict[str, Any], path: Path) -> None:
    arms = (results.get("overhead") or {}).get("ttft", {}).get("arms")
    if not arms:
        return
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = list(arms)
    for i, q in enumerate(("p50", "p99")):
        values = [arms[n].get(f"ttft_{q}_ms") or 0 for n in names]
        lows = [
            v - (arms[n].get(f"ttft_{q}_ms_min") or v) for n, v in zip(names, values, strict=True)
        ]
        highs = [
            (arms[n].get(f"ttft_{q}_ms_max") or v) - v for n, v in zip(names, values, strict=True)
        ]
        xs = [j + (i - 0.5) * 0.38 for j in range(len(names))]
        ax.bar(
            xs,
            values,
            0.38,
            yerr=[lows, highs],
            capsize=3,
            label=f"TTFT {q}",
            color=["#9ecae1", "#3182bd"][i],
        )
    ax.set_xticks(range(len(names)), [LABELS.get(n, n) for n in names], fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title("Time to first token, one request at a time (instant model)")
    ax.legend()
    _save(fig, path)


def _series(section: dict[str, Any], name: str, field: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for load in section["loads"]:
        s = section["arms"][name]["loads"].get(str(load))
        if s and s.get(field) is not None:
            xs.append(load)
            ys.append(s[field])
    return xs, ys


def balance_png(results: dict[str, Any], path: Path) -> None:
    section = results.get("balance")
    if not section or "arms" not in section:
        return
    panels = [
        ("ttft_p99_ms", "TTFT p99 (ms, log)", True),
        ("e2e_p99_ms", "end-to-end p99 (ms, log)", True),
        ("goodput_pct", "goodput (% of requests)", False),
        ("slow_share_pct", "work on the slow backend (%)", False),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (field, title, log) in zip(axes.flat, panels, strict=True):
        for name in section["arms"]:
            xs, ys = _series(section, name, field)
            style = "--" if name == "oracle" else "-"
            ax.plot(xs, ys, style, marker="o", label=LABELS.get(name, name), color=COLORS.get(name))
        ax.set_title(title)
        ax.set_xlabel("offered load (fraction of capacity)")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    _save(fig, path)


def cdf_png(results: dict[str, Any], path: Path) -> None:
    section = results.get("balance")
    if not section or "arms" not in section:
        return
    key = str(section["key_load"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, arm in section["arms"].items():
        values = arm.get("ttft_samples", {}).get(key) or []
        if values:
            ys = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(values, ys, where="post", label=LABELS.get(name, name), color=COLORS.get(name))
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (ms, log)")
    ax.set_ylabel("fraction of served requests")
    ax.set_title(f"TTFT distribution at load {key} (first repetition)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def streams_png(results: dict[str, Any], path: Path) -> None:
    rows = [r for r in (results.get("streams") or {}).get("rows", []) if "failed" not in r]
    if not rows:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    ns = [r["streams"] for r in rows]
    a.plot(ns, [r["kb_per_stream"] for r in rows], marker="o", color=COLORS["slipstream"])
    a.axhline(30, ls="--", color="grey", label="target 30 KB")
    a.set_title("gateway memory per open stream (KB)")
    b.plot(ns, [r["delivery_p99_ms"] or 0 for r in rows], marker="o", label="delivery p99")
    b.plot(ns, [r["healthz"].get("p99_ms") or 0 for r in rows], marker="s", label="/healthz p99")
    b.axhline(50, ls="--", color="grey", label="target 50 ms")
    b.set_title("latency (ms)")
    for ax in (a, b):
        ax.set_xlabel("concurrent streams")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def fleet_png(results: dict[str, Any], path: Path) -> None:
    section = results.get("fleet")
    if not section or not section.get("arms"):
        return
    arms = section["arms"]
    fig, axes = plt.subplots(len(arms), 1, figsize=(9, 2.4 * len(arms)), sharex=True, squeeze=False)
    for ax, (name, arm) in zip(axes[:, 0], arms.items(), strict=True):
        ok = [(t, v) for t, v, o, _ in arm["timeline"] if v is not None and o in ("ok", "late")]
        bad = [t for t, v, o, _ in arm["timeline"] if o not in ("ok", "late")]
        ax.scatter(
            [t for t, _ in ok], [v for _, v in ok], s=6, color=COLORS.get(name), label="TTFT"
        )
        edge = ax.get_xaxis_transform()  # x in data, y as a fraction of the axes
        ax.scatter(bad, [0.04] * len(bad), s=14, marker="x", color="black", transform=edge)
        if bad:
            ax.scatter([], [], s=14, marker="x", color="black", label="not served (at bottom)")
        for event in arm["events"]:
            ax.axvline(event["at_s"], ls="--", color="grey")
            ax.text(event["at_s"], 0.9, f" {event['event']}", fontsize=8, transform=edge)
        ax.set_yscale("log")
        ax.set_ylabel("TTFT ms")
        ax.set_title(LABELS.get(name, name), fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("arrival time (s)")
    axes[0, 0].legend(fontsize=8, loc="upper right")
    _save(fig, path)


SHORT = {
    "oracle-warm": "oracle",
    "slipstream-blind": "Slipstream\ncache-blind",
    "slipstream-warm": "Slipstream\nwarm-aware",
    "nginx-rr": "nginx\nround-robin",
    "haproxy": "haproxy\nleastconn",
    "nginx-hash": "nginx\nsticky hash",
}


def warm_png(results: dict[str, Any], path: Path) -> None:
    section = results.get("warm")
    if not section or not section.get("arms"):
        return
    arms = {n: a for n, a in section["arms"].items() if "failed" not in a}
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.4), width_ratios=[1.1, 1, 1])
    for name, arm in arms.items():
        values = arm.get("ttft_samples", {}).get("later") or []
        if values:
            ys = [(i + 1) / len(values) for i in range(len(values))]
            style = "--" if name.startswith("oracle") else "-"
            a.step(
                values,
                ys,
                style,
                where="post",
                label=LABELS.get(name, name),
                color=COLORS.get(name),
            )
    a.set_xscale("log")
    a.set_xlabel("time to first token, later turns (ms, log)")
    a.set_ylabel("fraction of later turns served")
    a.set_title(f"Later-turn TTFT at load {section['load']}")
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
    names = list(arms)
    labels = [SHORT.get(n, n) for n in names]
    xs = range(len(names))
    b.bar(
        xs,
        [arms[n].get("hit_ratio_pct") or 0 for n in names],
        color=[COLORS.get(n, "#888888") for n in names],
    )
    b.set_xticks(xs, labels, fontsize=7)
    b.set_ylabel("cached_tokens / prompt_tokens (%)")
    b.set_title("Prefix-cache hit ratio")
    b.grid(alpha=0.3, axis="y")
    workers = sorted({w for n in names for w in arms[n].get("per_worker", {})})
    bottom = [0.0] * len(names)
    for w in workers:
        share = []
        for n in names:
            per = arms[n].get("per_worker", {})
            total = sum(v["requests"] for v in per.values()) or 1
            share.append(100 * per.get(w, {}).get("requests", 0) / total)
        c.bar(xs, share, bottom=bottom, label=w)
        bottom = [x + y for x, y in zip(bottom, share, strict=True)]
    c.set_xticks(xs, labels, fontsize=7)
    c.set_ylabel("% of turns")
    c.set_title("Turns per worker")
    c.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(fig, path)


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    made = []
    for name, draw in (
        ("bench_overhead.png", overhead_png),
        ("bench_balance.png", balance_png),
        ("bench_ttft_cdf.png", cdf_png),
        ("bench_streams.png", streams_png),
        ("bench_fleet.png", fleet_png),
        ("bench_warm.png", warm_png),
    ):
        draw(results, out / name)
        if (out / name).exists():
            made.append(out / name)
    return made
