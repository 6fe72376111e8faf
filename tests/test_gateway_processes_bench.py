"""Smoke test of ``bench.gateway_processes``: its tiny plan runs end to end in seconds.

It proves the harness works for both arms (one gateway process and two on one port): tokens
are relayed, the two processes are both found and accounted, every held stream opens, and
the JSON has the shape docs/gateway_processes.md is written from. Not the figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_tiny_run_measures_both_arms(tmp_path: Path) -> None:
    out = tmp_path / "gp.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gateway_processes", "--tiny", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["relay"]) == {"1", "2"}
    for n, row in result["relay"].items():
        assert row["failed"] == [], row["failed"]
        assert row["tokens_per_s"] > 0
        assert row["gateway_us_per_token"] > 0
        assert 0 < row["gateway_share"] < 1
        assert {"gateway", "workers", "redis", "client"} <= set(row["cores"])
        # one CPU figure per serving process: the supervisor's children when N = 2
        assert [len(run) for run in row["per_process_cores"]] == [int(n)]
        assert sum(sum(run) for run in row["streams_per_process"]) == 8
    assert set(result["hold"]) == {"1/40", "2/40"}
    for row in result["hold"].values():
        assert row["failed"] == [], row["failed"]
        assert row["opened"] == 40
        assert row["delivery_samples"] > 0
        assert row["rss_plateau_mb"] > 0
    assert result["machine"]["cores"] >= 1
    assert "| N | tokens/s |" in done.stdout
