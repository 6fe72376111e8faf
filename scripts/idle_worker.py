"""Measure an idle worker's CPU use and how fast it picks up a job after idling.

Usage: PYTHONPATH=. .venv/bin/python scripts/idle_worker.py [--idle-s 10] [--jobs 20]
Starts its own redis-server and one sim worker process (loopback only), prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

from shared.jobs import JobStore
from shared.keys import Keys
from shared.redis import connect
from tests.helpers import make_job, start_redis, wait_state


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main(idle_s: float, jobs: int) -> dict[str, float]:
    redis_proc = start_redis()
    env = {**os.environ, "REDIS_URL": redis_proc.url, "SLIPSTREAM_LOG_LEVEL": "warning"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "slipstream", "worker", "--engine", "sim", "--sim-ttft-ms", "0"],
        env=env,
    )
    redis = connect(redis_proc.url)
    store = JobStore(redis, Keys(), ttl_s=600)
    try:
        while not await redis.zcard(Keys().workers_seen):
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)  # settle after start-up
        before = cpu_seconds(worker.pid)
        await asyncio.sleep(idle_s)
        idle_cpu = (cpu_seconds(worker.pid) - before) / idle_s
        latencies = []
        for _ in range(jobs):
            await asyncio.sleep(0.5)  # the worker is blocked in XREAD again
            job = make_job(max_tokens=1)
            sent = time.time()
            await store.enqueue(job)
            await wait_state(store, job, {"completed"})
            first = await store.read_log(job.model, job.id, count=1)
            latencies.append(int(first[0].stream_id.split("-")[0]) - sent * 1000)
        return {
            "idle_cpu_percent": round(idle_cpu * 100, 3),
            "idle_seconds": idle_s,
            "pickup_ms_p50": round(statistics.median(latencies), 2),
            "pickup_ms_max": round(max(latencies), 2),
            "jobs": jobs,
        }
    finally:
        worker.terminate()
        worker.wait(10)
        await redis.aclose()
        redis_proc.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.idle_s, args.jobs))))
