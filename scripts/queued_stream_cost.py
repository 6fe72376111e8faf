"""What a queued stream costs the gateway: CPU per queued stream per second.

    .venv/bin/python scripts/queued_stream_cost.py --streams 2000 --seconds 15

Starts its own redis-server (on CPU 0) and a gateway (pinned to CPU 1), plants a live worker
in the registry that never pulls (so every job stays queued; its advertised rate is high so
admission accepts them all), opens ``--streams`` streaming requests, waits until each stream
has been queued past the wait for a worker (``--settle`` seconds), then reports the gateway's
CPU over ``--seconds`` divided by the streams held. Compare two trees with ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.jobs import now_ms  # noqa: E402
from shared.keys import Keys  # noqa: E402
from shared.models import WorkerInfo  # noqa: E402

MODEL = "sim-model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def on_cpu(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


async def plant_worker(redis: Redis) -> None:
    now, keys = now_ms(), Keys()
    info = WorkerInfo(
        id="planted", host="bench", pid=1, model=MODEL, engine="sim", capacity_tokens=8192,
        max_seqs=4, started_at_ms=now, heartbeat_at_ms=now, tokens_per_s=10_000.0,
    )  # fmt: skip
    await redis.hset(keys.workers, info.id, info.model_dump_json())  # type: ignore[misc]
    await redis.zadd(keys.workers_seen, {info.id: now + 600_000})
    await redis.sadd(keys.models, MODEL)  # type: ignore[misc]


async def hold(port: int, i: int, opened: list[int]) -> None:
    """One streaming request, read until the connection ends or the task is cancelled."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps(
        {"model": MODEL, "stream": True, "max_tokens": 16, "messages": [
            {"role": "user", "content": f"queued {i}"}]}
    ).encode()  # fmt: skip
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    writer.write(head + b"content-length: %d\r\n\r\n" % len(body) + body)
    if b" 200 " in await reader.readline():
        opened.append(i)
    while await reader.read(65536):
        pass


async def wait_listening(port: int, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise TimeoutError("the gateway did not start listening")


async def measure(args: argparse.Namespace) -> dict[str, object]:
    rport, gport = free_port(), free_port()
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        preexec_fn=lambda: on_cpu(0),
    )
    env = dict(os.environ, REDIS_URL=f"redis://127.0.0.1:{rport}", SLIPSTREAM_LOG_LEVEL="warning")
    gateway = None
    redis = Redis(port=rport)
    try:
        await asyncio.sleep(0.5)
        await plant_worker(redis)
        gateway = subprocess.Popen(
            [sys.executable, "-m", "slipstream", "gateway", "--port", str(gport)],
            env=env,
            stdout=subprocess.DEVNULL,
            preexec_fn=lambda: on_cpu(1),
        )
        await wait_listening(gport)
        on_cpu(0)
        opened: list[int] = []
        tasks = []
        for i in range(args.streams):
            tasks.append(asyncio.create_task(hold(gport, i, opened)))
            if i % 100 == 99:
                await asyncio.sleep(0.1)
        await asyncio.sleep(args.settle)
        proc = psutil.Process(gateway.pid)
        cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
        await asyncio.sleep(args.seconds)
        cores = (sum(proc.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
        queued = await redis.hget(Keys().backlog(MODEL), "normal:jobs")  # type: ignore[misc]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {
            "opened": len(opened),
            "queued": int(queued or 0),
            "gateway_cores": round(cores, 3),
            "gateway_us_per_queued_stream_s": round(cores * 1e6 / max(1, len(opened)), 1),
        }
    finally:
        await redis.aclose()
        if gateway is not None:
            gateway.kill()
            gateway.wait(10)
        redis_proc.terminate()
        redis_proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--settle", type=float, default=12.0, help="past the worker wait (10 s)")
    print(json.dumps(asyncio.run(measure(parser.parse_args()))))


if __name__ == "__main__":
    main()
