"""Smoke test of the benchmark harness (bench/): it runs end to end on tiny traces.

It proves the harness works — the oracle, the direct arm and the Slipstream arm (plus the
streams and fleet-change experiments) produce results of the right shape, requests are served
and the report is written — not the performance figures, which ``make bench`` measures.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.oracle import simulate
from bench.result import OK
from bench.sse import Dechunker, SSEParser
from bench.trace import TraceSpec, make_trace

pytestmark = pytest.mark.slow


def test_trace_is_seeded_and_oracle_serves_everything() -> None:
    from bench.fleet import balance_fleet

    spec = TraceSpec(rate_per_s=20.0, duration_s=5.0)
    trace = make_trace(spec, seed=3)
    assert trace == make_trace(spec, seed=3)
    assert trace != make_trace(spec, seed=4)
    assert all(spec.min_tokens <= r.max_tokens <= spec.max_tokens for r in trace)
    results = simulate(trace, balance_fleet())
    assert [r.idx for r in results] == [r.idx for r in trace]
    assert all(r.outcome == OK and r.ttft_ms is not None for r in results)


def test_multiturn_trace_is_seeded_and_grows_each_turn() -> None:
    from bench.fleet import warm_fleet
    from bench.warm_oracle import simulate_oracle
    from bench.warm_trace import make_workload, turn_shapes

    fleet = warm_fleet()
    work = make_workload(fleet, 0.85, 10.0, seed=3)
    assert work.conversations == make_workload(fleet, 0.85, 10.0, seed=3).conversations
    for conv in work.conversations:
        assert 3 <= len(conv.users) <= 10
        prompts = [p for p, _ in turn_shapes([conv])]
        assert 900 <= prompts[0] <= 1300  # ~1,000-token system prompt + the first message
        assert all(50 <= b - a <= 400 for a, b in itertools.pairwise(prompts))
    results = simulate_oracle(work.conversations, fleet)
    assert len(results) == sum(len(c.users) for c in work.conversations)
    later = [r for r in results if r.turn > 0]
    assert sum(r.cached_tokens for r in later) > 0.8 * sum(r.prompt_tokens for r in later)


def test_sse_parser_counts_tokens_across_chunk_boundaries() -> None:
    token = b'id: 1\ndata: {"choices":[{"text":" a","finish_reason":null}]}\n\n'
    end = b'data: {"choices":[{"text":"","finish_reason":"length"}]}\n\ndata: [DONE]\n\n'
    body = token * 3 + b": ping\n\n" + end
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:7], body[7:50], body[50:]))
    dechunker, parser = Dechunker(), SSEParser(track_ids=True)
    for i in range(0, len(chunked + b"0\r\n\r\n"), 5):
        parser.feed(dechunker.feed((chunked + b"0\r\n\r\n")[i : i + 5]))
    assert dechunker.done
    assert (parser.tokens, parser.pings, parser.done) == (3, 1, True)
    assert parser.finish_reason == "length" and parser.ids == [1, 1, 1]


def test_smoke_run_end_to_end(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "smoke-latest.json").read_text())
    assert {"plan", "machine", "overhead", "balance", "streams", "fleet", "warm"} <= set(results)

    ttft = results["overhead"]["ttft"]["arms"]
    assert set(ttft) == {"direct", "slipstream"}
    for row in ttft.values():
        assert row["served"] == row["requests"] > 0
        assert row["ttft_p50_ms"] > 0 and row["ttft_p99_ms"] >= row["ttft_p50_ms"]
    assert "added_p50_ms" in ttft["slipstream"]

    arms = results["balance"]["arms"]
    assert set(arms) == {"oracle", "slipstream"}
    for arm in arms.values():
        run = arm["loads"]["0.3"]
        assert run["served"] == run["requests"] > 0
        assert sum(run["outcomes"].values()) == run["requests"]
        assert 0 <= run["goodput_pct"] <= 100
        assert set(run["by_backend"]) <= {"fast-1", "fast-2", "slow-1"}

    (streams,) = results["streams"]["rows"]
    assert streams["opened"] == streams["streams"] == 20
    assert streams["kb_per_stream"] is not None and streams["delivery_samples"] > 0

    fleet = results["fleet"]["arms"]["slipstream"]
    assert fleet["summary"]["served"] > 0 and len(fleet["actions"]) == 2
    assert [e["event"] for e in fleet["events"]] == ["join", "leave"]

    warm = results["warm"]["arms"]
    assert set(warm) == {"oracle-warm", "slipstream-warm"}
    for arm in warm.values():
        assert arm["served"] == arm["planned_turns"] > 0
        assert arm["hit_ratio_pct"] > 0 and arm["answers_mismatched"] == 0
        assert arm["ttft_later_p50_ms"] is not None

    doc = (tmp_path / "benchmarks.md").read_text()
    assert "bench:begin" in doc and "## 2. Balancing quality" in doc
    assert "bench-warm:begin" in doc and "## 5. Warm state" in doc
    for png in ("bench_overhead.png", "bench_balance.png", "bench_fleet.png", "bench_warm.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_a_missing_arm_is_named_in_the_report_and_the_headline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nginx and haproxy off the PATH (redis-server on it), their arms are recorded as
    skipped, the report says so, and the headline's comparisons with them are rows saying
    why, not rows that vanish."""
    import shutil

    from bench.arms import skipped_arms
    from bench.report import method_md
    from bench.targets import balance_rows, overhead_rows

    redis = shutil.which("redis-server")
    assert redis is not None
    (tmp_path / "redis-server").symlink_to(redis)
    monkeypatch.setenv("PATH", str(tmp_path))
    skipped = skipped_arms()
    assert skipped["nginx-rr"] == "arm skipped: nginx not installed"
    assert skipped["haproxy"] == "arm skipped: haproxy not installed"
    assert "slipstream" not in skipped
    slip = {"ttft_p99_ms": 300.0, "goodput_pct": 99.0}
    results = {
        "skipped_arms": skipped,
        "overhead": {"ttft": {"arms": {"slipstream": {"added_p50_ms": 1.2}}}},
        "balance": {"key_load": 0.85, "arms": {"slipstream": {"loads": {"0.85": slip}}}},
    }
    rows = {what: (measured, met) for what, _, measured, met in balance_rows(results)}
    assert rows["p99 TTFT at load 0.85 vs nginx round-robin"] == (skipped["nginx-rr"], "-")
    assert rows["p99 TTFT at load 0.85 vs haproxy leastconn"] == (skipped["haproxy"], "-")
    assert "nginx: arm skipped: nginx not installed" in overhead_rows(results)[0][2]
    machine = {k: "?" for k in ("cpu", "cores", "memory_gb", "kernel", "python")}
    machine |= {"redis-server": "?", "nginx": "-", "haproxy": "-", "packages": {}}
    plan = {"mode": "quick", "seed": 1, "reps": 1, "loads": [], "balance_duration_s": 1.0}
    plan |= {"key_load": 0.85, "stream_counts": [], "churn_duration_s": 1.0}
    report = method_md({**results, "plan": plan, "machine": machine})
    assert "nginx round-robin: arm skipped: nginx not installed" in report


@pytest.mark.parametrize("what", ["inline", "sse", "telemetry", "enqueue", "scripts"])
def test_in_process_micro_benchmarks_run(what: str) -> None:
    """``bench.micro``'s in-process runs build gateway objects by hand: one broke once
    when ``Dispatch`` began reading more of its job (caught by review, not by a test)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.micro", what],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "µs" in done.stdout
