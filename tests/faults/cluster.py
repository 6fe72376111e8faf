"""Real processes for the fault-injection suite: redis-server, gateways and workers.

Every process is a child of the test and is killed at teardown; everything listens on
127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.helpers import RedisProcess, free_port, start_redis, wait_for_port

FAST_LEASES = {
    "SLIPSTREAM_LEASE_S": "0.6",
    "SLIPSTREAM_HEARTBEAT_S": "0.1",
    "SLIPSTREAM_WORKER_TTL_S": "1.0",
    "SLIPSTREAM_LOG_LEVEL": "warning",
}


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int | None = None

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(10)


@dataclass
class Cluster:
    redis: RedisProcess
    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)

    @classmethod
    def start(cls, *, aof: bool = False, **env: str) -> Cluster:
        redis = (
            start_redis(aof=aof) if not aof else start_redis("--appendfsync", "everysec", aof=True)
        )
        full_env = {**os.environ, **FAST_LEASES, **env, "REDIS_URL": redis.url}
        return cls(redis, full_env)

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        popen = subprocess.Popen(
            [sys.executable, "-m", "slipstream", *args],
            env={**self.env, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL if name.startswith("worker") else None,
        )
        proc = Proc(name, popen)
        self.procs.append(proc)
        return proc

    def gateway(self, **env: str) -> Proc:
        port = free_port()
        args = ["gateway", "--port", str(port), "--model", "sim-model", "--model", "gemma-3-270m"]
        proc = self._spawn(f"gateway-{port}", args, env)
        proc.port = port
        wait_for_port(port, 20)
        return proc

    def worker(self, worker_id: str, *extra: str, **env: str) -> Proc:
        args = ["worker", "--model", "sim-model", "--engine", "sim", "--worker-id", worker_id]
        return self._spawn(f"worker-{worker_id}", [*args, *extra], env)

    def llama_worker(self, worker_id: str, *args: str) -> Proc:
        """A worker with the real model (``args`` name model, engine and slots)."""
        return self._spawn(f"worker-{worker_id}", ["worker", "--worker-id", worker_id, *args])

    async def wait_workers(self, n: int, timeout: float = 20.0) -> None:
        await wait_workers(self.redis.url, n, timeout)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait(10)
        self.redis.stop(kill=True)


@dataclass
class StreamRecord:
    """What one client saw: (event id, data, arrival time) per SSE data line."""

    job_id: str = ""
    frames: list[tuple[int | None, str, float]] = field(default_factory=list)
    status: int = 0

    def ids(self) -> list[int]:
        return [i for i, _, _ in self.frames if i is not None]

    def text(self) -> str:
        out = []
        for _, data, _ in self.frames:
            if data.startswith("{"):
                for choice in json.loads(data).get("choices", []):
                    out.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
        return "".join(out)

    def terminals(self) -> list[dict[str, Any]]:
        out = []
        for _, data, _ in self.frames:
            if data.startswith("{"):
                obj = json.loads(data)
                if "error" in obj or any(c.get("finish_reason") for c in obj.get("choices", [])):
                    out.append(obj)
        return out

    def usage_chunks(self) -> int:
        return sum(1 for _, d, _ in self.frames if d.startswith("{") and '"usage"' in d)

    def largest_gap_s(self) -> float:
        times = [t for _, d, t in self.frames if d.startswith("{")]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


async def read_stream(
    response: httpx.Response, record: StreamRecord, stop_after: int | None = None
) -> None:
    event_id: int | None = None
    async for line in response.aiter_lines():
        if line.startswith("id: "):
            event_id = int(line[4:])
        elif line.startswith("data: "):
            record.frames.append((event_id, line[6:], time.monotonic()))
            event_id = None
            if stop_after is not None and len(record.frames) >= stop_after:
                return


def check_stream(record: StreamRecord, expected_text: str | None = None) -> None:
    """The checker: sequence with no gap and no duplicate, one terminal, usage once."""
    ids = record.ids()
    assert ids, (
        f"no events (status {record.status}, job {record.job_id}, frames {record.frames[:3]})"
    )
    assert ids == list(range(ids[0], ids[0] + len(ids))), f"gap or duplicate in {ids}"
    assert len(record.terminals()) == 1, record.terminals()
    assert record.frames[-1][1] == "[DONE]"
    assert record.usage_chunks() <= 1
    if expected_text is not None:
        assert record.text() == expected_text


async def stream_completion(
    base: str,
    prompt: str,
    max_tokens: int,
    record: StreamRecord,
    *,
    headers: dict[str, str] | None = None,
    stop_after: int | None = None,
    timeout: float = 60.0,
    model: str = "sim-model",
) -> None:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    async with (
        httpx.AsyncClient(base_url=base, timeout=timeout) as client,
        client.stream("POST", "/v1/completions", json=body, headers=headers) as response,
    ):
        record.status = response.status_code
        record.job_id = response.headers.get("x-slipstream-job-id", "")
        await read_stream(response, record, stop_after)


async def resume(base: str, record: StreamRecord, timeout: float = 60.0) -> None:
    """Read the rest of ``record``'s job from ``base`` with Last-Event-ID."""
    ids = record.ids()
    headers = {"Last-Event-ID": str(ids[-1])} if ids else {}
    async with (
        httpx.AsyncClient(base_url=base, timeout=timeout) as client,
        client.stream("GET", f"/v1/jobs/{record.job_id}/events", headers=headers) as response,
    ):
        await read_stream(response, record)


async def wait_frames(record: StreamRecord, n: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while len(record.frames) < n:
        if time.monotonic() > end:
            raise TimeoutError(f"only {len(record.frames)} frames")
        await asyncio.sleep(0.002)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def record_result(name: str, **figures: Any) -> None:
    """Append one fault's outcome to artifacts/faults.jsonl (docs/reliability.md reads it)."""
    os.makedirs("artifacts", exist_ok=True)
    with open("artifacts/faults.jsonl", "a") as out:
        out.write(json.dumps({"fault": name, **figures}) + "\n")


async def wait_workers(url: str, n: int, timeout: float = 20.0) -> None:
    """Until ``n`` workers are live in the registry of the Redis at ``url``."""
    from shared.fleet import live_workers
    from shared.keys import Keys
    from shared.redis import connect

    redis = connect(url)
    try:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(await live_workers(redis, Keys(), 1.0)) >= n:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{n} workers did not register")
    finally:
        await redis.aclose()
