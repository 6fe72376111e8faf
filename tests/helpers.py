"""Test helpers: a real redis-server, in-process gateway and workers, free ports."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from gateway.app import create_app
from gateway.entry import entry
from gateway.settings import GatewaySettings
from worker.engines import build_engine
from worker.service import Worker
from worker.settings import WorkerSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisProcess:
    port: int
    proc: subprocess.Popen[bytes]
    dir: str
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            self.proc.wait(10)

    def restart(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL)
        wait_for_port(self.port)


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {port}")


def start_redis(*extra: str, aof: bool = False) -> RedisProcess:
    server = shutil.which("redis-server")
    assert server, "redis-server must be installed (apt-get install redis-server)"
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="slip-redis-")
    args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir]
    args += ["--appendonly", "yes" if aof else "no", *extra]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    wait_for_port(port)
    return RedisProcess(port, proc, workdir, args)


def gateway_settings(redis_url: str, **overrides: Any) -> GatewaySettings:
    base: dict[str, Any] = {
        "redis_url": redis_url,
        "port": free_port(),
        "models": ["sim-model"],
        "worker_wait_s": 5.0,
        "log_level": "warning",
    }
    return GatewaySettings(**{**base, **overrides})


def worker_settings(redis_url: str, **overrides: Any) -> WorkerSettings:
    base: dict[str, Any] = {
        "redis_url": redis_url,
        "model": "sim-model",
        "engine": "sim",
        "sim_ttft_ms": 5.0,
        "sim_tokens_per_s": 500.0,
        "heartbeat_s": 0.2,
        "coalesce_ms": 2.0,
        "log_level": "warning",
    }
    return WorkerSettings(**{**base, **overrides})


@contextlib.asynccontextmanager
async def running_gateway(settings: GatewaySettings) -> AsyncIterator[str]:
    """Serve the gateway in this event loop; yields its base URL (``http://host:port``)."""
    async with running_app(entry(create_app(settings)), settings.port) as base:
        yield base


@contextlib.asynccontextmanager
async def running_app(app: Any, port: int) -> AsyncIterator[str]:
    """Serve an app built by the test (``create_app`` plus test-only routes); yields its URL."""
    config = uvicorn.Config(
        app,
        interface="asgi3",  # every app here is; ``direct_send``'s is a plain function
        host="127.0.0.1",
        port=port,
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def running_worker(settings: WorkerSettings) -> AsyncIterator[Worker]:
    from shared.redis import connect

    redis = connect(settings.redis_url)
    worker = Worker(settings, redis, build_engine(settings))
    task = asyncio.create_task(worker.run())
    while not await redis.hexists(worker.keys.workers, worker.id):
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield worker
    finally:
        worker.stop()
        try:
            await asyncio.wait_for(task, 10)
        finally:
            await redis.aclose()


def make_job(
    model: str = "sim-model",
    *,
    max_tokens: int = 8,
    priority: str = "normal",
    prompt: str = "hello",
    deadline_ms: int | None = None,
) -> Any:
    """A completion job as the gateway would build it."""
    import uuid

    from shared.jobs import now_ms
    from shared.models import Job, Priority, SamplingParams

    now = now_ms()
    return Job(
        id=uuid.uuid4().hex,
        model=model,
        kind="completion",
        prompt=prompt,
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        priority=Priority(priority),
        enqueued_at_ms=now,
        deadline_at_ms=None if deadline_ms is None else now + deadline_ms,
        prompt_tokens_estimate=2,
        request_id=uuid.uuid4().hex,
    )


async def wait_state(store: Any, job: Any, states: set[str], timeout: float = 10.0) -> str:
    """Poll the job's state until it is one of ``states``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = (await store.state(job.model, job.id)).get("state", "")
        if state in states:
            return str(state)
        await asyncio.sleep(0.01)
    raise TimeoutError(f"job {job.id} did not reach {states}")


async def started_at_ms(store: Any, job: Any, timeout: float = 2.0) -> int:
    """When a worker started the job: the stream id of its first logged event (a job just
    claimed logs ``started`` with its first token, within the coalescing interval)."""
    end = time.monotonic() + timeout
    while not (entries := await store.read_log(job.model, job.id, count=1)):
        if time.monotonic() > end:
            raise TimeoutError(f"job {job.id} logged nothing in {timeout} s")
        await asyncio.sleep(0.005)
    return int(entries[0].stream_id.split("-")[0])
