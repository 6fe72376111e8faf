"""Hosts whose clocks are off by ±30 s (libfaketime) beside correct ones: Redis's clock rules.

Workers at +30 s and -30 s serve beside a correct one, behind a correct gateway; a gateway at
-30 s takes requests with deadlines. No lease is taken from a live worker (every job is
delivered once, no worker logs ``job_fenced``), every worker stays live, a killed worker ahead
of time drops out within the TTL, and deadlines hold to Redis's time.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.fleet import live_workers
from shared.keys import Keys
from shared.redis import connect
from tests.faults.cluster import (
    Cluster,
    Proc,
    StreamRecord,
    check_stream,
    stream_completion,
)
from tests.helpers import free_port, wait_for_port
from worker.engines.sim import greedy_text as sim_text

FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"
pytestmark = pytest.mark.skipif(
    not os.path.exists(FAKETIME_LIB),
    reason="needs libfaketime (scripts/install-system-deps.sh faketime)",
)
SKEWS = {"w-ok": None, "w-ahead": "+30s", "w-behind": "-30s"}


def spawn(cluster: Cluster, name: str, args: list[str], skew: str | None, log: Path) -> Proc:
    env = {**cluster.env, "SLIPSTREAM_LOG_LEVEL": "info"}
    if skew is not None:
        env |= {"LD_PRELOAD": FAKETIME_LIB, "FAKETIME": skew, "FAKETIME_DONT_RESET": "1"}
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "slipstream", *args], env=env, stdout=out, stderr=out
        )
    proc = Proc(name, popen)
    cluster.procs.append(proc)
    return proc


def worker(cluster: Cluster, worker_id: str, log: Path) -> Proc:
    args = ["worker", "--model", "sim-model", "--engine", "sim", "--worker-id", worker_id]
    return spawn(cluster, worker_id, args, SKEWS[worker_id], log)


def gateway(cluster: Cluster, skew: str | None, log: Path) -> str:
    port = free_port()
    spawn(cluster, f"gateway-{port}", ["gateway", "--port", str(port)], skew, log)
    wait_for_port(port, 20)
    return f"http://127.0.0.1:{port}"


async def live_ids(cluster: Cluster) -> set[str]:
    redis = connect(cluster.redis.url)
    try:
        return {w.id for w in await live_workers(redis, Keys(), 1.0)}
    finally:
        await redis.aclose()


async def wait_live(cluster: Cluster, want: set[str], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while (seen := await live_ids(cluster)) != want:
        assert time.monotonic() < end, f"live workers {seen}, expected {want}"
        await asyncio.sleep(0.05)


async def fill_every_slot(http: httpx.AsyncClient) -> list[str]:
    """Nine ~5 s jobs: every sequence of the three workers (3 each) busy."""
    body = {"model": "sim-model", "prompt": "long", "max_tokens": 200}
    ids = [(await http.post("/v1/jobs", json=body)).json()["id"] for _ in range(9)]
    end = time.monotonic() + 10
    for job_id in ids:
        while (await http.get(f"/v1/jobs/{job_id}")).json()["status"] != "running":
            assert time.monotonic() < end, "the long jobs did not all start"
            await asyncio.sleep(0.05)
    return ids


async def wait_done(http: httpx.AsyncClient, job_id: str, timeout: float = 20.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while (job := (await http.get(f"/v1/jobs/{job_id}")).json())["status"] in ("queued", "running"):
        assert time.monotonic() < end, job
        await asyncio.sleep(0.1)
    return dict(job)


async def test_skewed_clocks_take_no_lease_and_kill_no_worker(tmp_path: Path) -> None:
    cluster = Cluster.start(
        SLIPSTREAM_SIM_TOKENS_PER_S="40", SLIPSTREAM_MAX_SEQS="3", SLIPSTREAM_LEASE_S="0.6"
    )
    try:
        for worker_id in SKEWS:
            worker(cluster, worker_id, tmp_path / f"{worker_id}.log")
        base = gateway(cluster, None, tmp_path / "gateway.log")
        late_base = gateway(cluster, "-30s", tmp_path / "gateway-behind.log")
        await wait_live(cluster, set(SKEWS))  # -30 s: its beats must not look 30 s old

        # 9 jobs of ~1 s (longer than the 0.6 s lease: renewed, never taken over)
        records = [StreamRecord() for _ in range(9)]
        prompts = [f"skew {i}" for i in range(9)]
        async with asyncio.timeout(60):
            await asyncio.gather(
                *(stream_completion(base, p, 40, r) for p, r in zip(prompts, records, strict=True))
            )
            assert await live_ids(cluster) == set(SKEWS)
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            for prompt, record in zip(prompts, records, strict=True):
                check_stream(record, sim_text(prompt, 40))
                job = (await http.get(f"/v1/jobs/{record.job_id}")).json()
                assert job["deliveries"] == 1, job

        # deadlines through a gateway 30 s behind: neither cut short nor stretched
        async with httpx.AsyncClient(base_url=late_base, timeout=20) as late:
            body = {"model": "sim-model", "prompt": "dl", "max_tokens": 12, "deadline_ms": 5000}
            fits = await late.post("/v1/completions", json=body)
            assert fits.status_code == 200, fits.text  # 0.3 s of work in a 5 s budget
            async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                long_jobs = await fill_every_slot(http)
                started = time.monotonic()
                body |= {"deadline_ms": 1500}
                queued = await late.post("/v1/completions", json=body)  # no room: it waits
                took = time.monotonic() - started
                assert queued.status_code == 504, queued.text
                assert queued.json()["error"]["code"] == "deadline_exceeded"
                assert 1.3 <= took <= 4.0, took
                for job_id in long_jobs:  # ~5 s each, many leases long: never taken over
                    job = await wait_done(http, job_id)
                    assert job["status"] == "completed" and job["deliveries"] == 1, job

        # a worker ahead of time that dies drops out within the TTL, not 30 s later
        next(p for p in cluster.procs if p.name == "w-ahead").kill()
        await wait_live(cluster, {"w-ok", "w-behind"}, timeout=4.0)
    finally:
        cluster.stop()
    logs = {w: (tmp_path / f"{w}.log").read_text() for w in SKEWS}
    assert not [w for w, text in logs.items() if "job_fenced" in text], logs
