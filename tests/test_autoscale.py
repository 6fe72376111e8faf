"""The autoscaler with real ``slipstream worker`` processes: a burst scales the fleet up, quiet
drains it back to ``--min``, and every request is answered."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis

from shared.fleet import live_workers
from shared.keys import Keys
from slipstream.autoscale import Autoscaler, WorkerCommandFailing, WorkerProcesses
from slipstream.scaling import ScalePolicy
from tests.helpers import gateway_settings, running_gateway

MODEL = "sim-model"
WORKER = [
    *(sys.executable, "-m", "slipstream", "worker", "--engine", "sim", "--model", MODEL),
    *("--capacity-tokens", "100", "--max-seqs", "2", "--sim-tokens-per-s", "40"),
    *("--sim-ttft-ms", "10"),
]
POLICY = ScalePolicy(
    min_workers=1,
    max_workers=3,
    up_ratio=1.0,
    up_ticks=2,
    down_ticks=3,
    down_util=0.3,
    up_cooldown_s=2.0,
    down_cooldown_s=2.0,
    max_step=2,
    worker_tokens=100,
)
ARTIFACT = pathlib.Path(__file__).resolve().parent.parent / "artifacts" / "autoscale.json"


@pytest.fixture
async def scaler(redis: Redis, redis_url: str) -> AsyncIterator[Autoscaler]:
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "SLIPSTREAM_HEARTBEAT_S": "0.2",
        "SLIPSTREAM_WORKER_TTL_S": "1.0",
        "SLIPSTREAM_LOG_LEVEL": "warning",
    }
    procs = WorkerProcesses(WORKER, env=env, drain_timeout_s=10.0)
    scaler = Autoscaler(POLICY, procs, redis, Keys(), MODEL, ttl_s=1.0, interval_s=0.5)
    stop = asyncio.Event()
    task = asyncio.create_task(scaler.run(stop))
    try:
        yield scaler
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    assert not procs.children


async def ask(client: httpx.AsyncClient, base: str, i: int) -> tuple[int, str]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"burst {i}"}],
        "max_tokens": 40,
    }
    response = await client.post(f"{base}/v1/chat/completions", json=body)
    text = response.json()["choices"][0]["message"]["content"] if response.is_success else ""
    return response.status_code, text


async def sample(scaler: Autoscaler, redis: Redis, series: list[dict[str, float]]) -> None:
    start = time.monotonic()
    while True:
        live = await live_workers(redis, Keys(), 1.0)
        series.append(
            {
                "t": round(time.monotonic() - start, 2),
                "running": len(scaler.procs.running),
                "draining": len(scaler.procs.draining),
                "registered": len([w for w in live if not w.draining]),
            }
        )
        await asyncio.sleep(0.25)


async def wait_until(predicate: object, timeout: float) -> None:
    assert callable(predicate)
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_burst_scales_up_then_quiet_drains_to_min(
    scaler: Autoscaler, redis: Redis, redis_url: str
) -> None:
    series: list[dict[str, float]] = []
    settings = gateway_settings(redis_url, worker_wait_s=15.0)
    async with running_gateway(settings) as base, httpx.AsyncClient(timeout=60) as client:
        sampler = asyncio.create_task(sample(scaler, redis, series))
        try:
            await wait_until(lambda: series and series[-1]["registered"] == 1, 15)
            burst = [ask(client, base, i) for i in range(24)]
            answers = await asyncio.gather(*burst)
            peak = max(p["registered"] for p in series)
            await wait_until(
                lambda: len(scaler.procs.children) == 1 and not series[-1]["draining"], 25
            )
            await asyncio.sleep(0.5)
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
    statuses = [code for code, _ in answers]
    assert statuses == [200] * 24, statuses
    assert all(len(text.split()) == 40 for _, text in answers)  # every job ran to its end
    assert peak == POLICY.max_workers, series
    assert series[-1]["running"] == POLICY.min_workers
    assert [t.delta for t in scaler.history if t.delta] == [1, 2, -1, -1]  # min, burst, quiet
    compact = compress(series)
    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_text(json.dumps({"series": series, "changes": compact}, indent=1))
    print("\nworkers over time (t s: running/draining/registered):", compact)


def compress(series: list[dict[str, float]]) -> list[str]:
    """Only the samples where something changed, as ``t:running/draining/registered``."""
    out: list[str] = []
    last = None
    for p in series:
        now = (p["running"], p["draining"], p["registered"])
        if now != last:
            out.append(f"{p['t']}s:{now[0]}/{now[1]}/{now[2]}")
            last = now
    return out


def test_cli_autoscale_starts_min_and_drains_on_sigterm(redis_url: str) -> None:
    env = {**os.environ, "REDIS_URL": redis_url, "SLIPSTREAM_LOG_LEVEL": "warning"}
    cmd = [sys.executable, "-m", "slipstream", "autoscale", "--min", "2", "--max", "2"]
    cmd += ["--interval", "0.2", "--", *WORKER]
    proc = subprocess.Popen(cmd, env=env)
    try:
        asyncio.run(wait_registered(redis_url, 2, 15))
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
    asyncio.run(wait_registered(redis_url, 0, 5))


async def wait_registered(redis_url: str, count: int, timeout: float) -> None:
    from shared.redis import connect

    redis = connect(redis_url)
    try:
        end = time.monotonic() + timeout
        while len(await live_workers(redis, Keys(), 2.0)) != count:
            assert time.monotonic() < end, f"expected {count} live workers"
            await asyncio.sleep(0.1)
    finally:
        await redis.aclose()


@pytest.mark.parametrize(
    "command",
    [[sys.executable, "-c", "raise SystemExit(3)"], ["/nonexistent/slipstream-worker"]],
)
async def test_a_crash_looping_worker_command_stops_the_autoscaler(
    redis: Redis, command: list[str]
) -> None:
    procs = WorkerProcesses(command, drain_timeout_s=1.0)
    scaler = Autoscaler(POLICY, procs, redis, Keys(), MODEL, ttl_s=1.0, interval_s=0.05)
    with pytest.raises(WorkerCommandFailing):
        await asyncio.wait_for(scaler.run(asyncio.Event()), 20)
    assert not procs.children


def test_cli_reports_bad_janitor_interval() -> None:
    from typer.testing import CliRunner

    from slipstream.cli import app

    result = CliRunner().invoke(app, ["janitor", "--interval", "7"])
    assert result.exit_code == 2 and "divide 60" in result.output
