"""Where an open stream's memory goes: tracemalloc in a gateway holding N SSE streams.

    .venv/bin/python scripts/stream_memory.py 1000
    .venv/bin/python scripts/stream_memory.py 1000 4000   # each prompt 4,000 characters longer

Starts its own redis-server (temporary directory, free port), a simulated worker generating
1 token/s per stream, the gateway in this process with tracemalloc on, and a client process
that opens N streams at once; it waits until the gateway relays them all. Prints the traced
bytes per stream (the figure quoted in docs/benchmarks.md) and the allocation sites that hold
the most. A profiling tool, not a benchmark: tracemalloc itself inflates RSS, so the bench's
RSS figures come from `make bench`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import httpx
import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.app import create_app  # noqa: E402
from gateway.entry import entry  # noqa: E402
from gateway.settings import GatewaySettings  # noqa: E402
from tests.helpers import free_port, running_app  # noqa: E402

CLIENT = r"""
import asyncio, sys
async def one(port, i):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    pad = b"x" * int(sys.argv[3])
    body = b'{"model":"sim","prompt":"s %d %s","max_tokens":500,"stream":true}' % (i, pad)
    head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    writer.write(head + b"content-length: %d\r\n\r\n" % len(body) + body)
    while await reader.read(65536):
        pass
async def main(port, n):
    tasks = [asyncio.create_task(one(port, i)) for i in range(n)]
    await asyncio.sleep(3600)
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


async def measure(n: int, redis_url: str, pad: int) -> None:
    worker = subprocess.Popen(
        [
            *(sys.executable, "-m", "slipstream", "worker", "--model", "sim", "--engine", "sim"),
            *("--max-seqs", str(n + 64), "--capacity-tokens", "100000000"),
            *("--sim-ttft-ms", "0", "--sim-tokens-per-s", "1", "--sim-slowdown", "0"),
        ],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": redis_url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    settings = GatewaySettings(redis_url=redis_url, models=["sim"], log_level="warning")
    port = free_port()
    client = None
    try:
        async with (
            running_app(entry(create_app(settings)), port),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http,
        ):
            await asyncio.sleep(3)
            await relaying(http)  # the /metrics client's imports and pools, before the snapshot
            gc.collect()
            tracemalloc.start(1)
            before = tracemalloc.take_snapshot()
            client = subprocess.Popen([sys.executable, "-c", CLIENT, str(port), str(n), str(pad)])
            opened = await open_streams(http, n, timeout=max(30.0, n / 20))
            await asyncio.sleep(4)  # tokens flowing in every stream
            gc.collect()
            held = tracemalloc.take_snapshot().compare_to(before, "lineno")
            total = sum(s.size_diff for s in held)
            print(f"{n} streams ({opened} relaying): {total / n / 1024:.1f} KB traced per stream")
            for s in held[:20]:
                frame = s.traceback[0]
                where = frame.filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
                size, count = s.size_diff / n, s.count_diff / n
                print(f"{size:8.0f} B {count:5.1f} objects  {where}:{frame.lineno}")
            client.kill()
    finally:
        if client is not None:
            client.kill()
        worker.kill()


async def relaying(http: httpx.AsyncClient) -> int:
    """The streams the gateway relays now (its ``open_streams`` gauge)."""
    text = (await http.get("/metrics")).text
    lines = [x for x in text.splitlines() if x.startswith("slipstream_gateway_open_streams")]
    if not lines:
        raise RuntimeError("the gateway's /metrics has no slipstream_gateway_open_streams")
    return int(float(lines[0].split()[-1]))


async def open_streams(http: httpx.AsyncClient, n: int, timeout: float) -> int:
    """Wait until the gateway relays ``n`` streams or ``timeout`` passes; returns how many it
    relays. A stream whose job has not started yet still holds its request (the body, the
    ``Job``), so a snapshot taken at a fixed time measured a mix that depended on the
    machine's speed."""
    end = asyncio.get_running_loop().time() + timeout
    while (count := await relaying(http)) < n and asyncio.get_running_loop().time() < end:
        await asyncio.sleep(0.5)
    return count


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    pad = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    # one log line per request otherwise
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        redis = subprocess.Popen(
            [
                *("redis-server", "--port", str(port), "--save", "", "--appendonly", "no"),
                *("--dir", tmp, "--maxclients", "30000"),
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            asyncio.run(measure(n, f"redis://127.0.0.1:{port}/0", pad))
        finally:
            redis.kill()


if __name__ == "__main__":
    main()
