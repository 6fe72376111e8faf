"""A real-model Slipstream on loopback for the llama benchmarks, and their doc sections.

``LlamaStack`` starts its own redis-server, one gateway and ``llama`` workers (the packaged
Gemma 3 270M) as subprocesses, waits until every worker has registered, and stops them all
(also on error). ``write_section`` replaces one marked section of docs/llama_benchmark.md and
keeps the others.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from tests.helpers import RedisProcess, free_port, start_redis, wait_for_port

MODEL = "gemma-3-270m"
DOC = "docs/llama_benchmark.md"


class LlamaStack:
    """Redis + a gateway (``gateway_env`` added to its environment) + one ``llama`` worker per
    entry of ``workers`` (each the extra ``slipstream worker`` flags of that worker)."""

    def __init__(self, workers: list[list[str]], gateway_env: dict[str, str] | None = None):
        self.worker_args = workers
        self.gateway_env = gateway_env or {}
        self.redis: RedisProcess | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> LlamaStack:
        try:
            await self.start()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def start(self, timeout_s: float = 120.0) -> None:
        self.redis = start_redis()
        env = {**os.environ, "REDIS_URL": self.redis.url, "SLIPSTREAM_LOG_LEVEL": "warning"}
        cli = [sys.executable, "-m", "slipstream"]
        self.procs.append(
            subprocess.Popen(
                [*cli, "gateway", "--port", str(self.port), "--model", MODEL],
                env=env | self.gateway_env,
            )
        )
        for i, extra in enumerate(self.worker_args):
            args = ["worker", "--engine", "llama", "--model", MODEL, "--worker-id", f"w{i + 1}"]
            self.procs.append(subprocess.Popen([*cli, *args, *extra], env=env))
        wait_for_port(self.port, 30)
        await self.wait_workers(len(self.worker_args), timeout_s)

    async def wait_workers(self, n: int, timeout_s: float) -> None:
        from shared.fleet import live_workers
        from shared.keys import Keys
        from shared.redis import connect

        assert self.redis is not None
        redis = connect(self.redis.url)
        try:
            end = time.monotonic() + timeout_s
            while time.monotonic() < end:
                if len(await live_workers(redis, Keys(), 2.0)) >= n:
                    return
                if any(p.poll() is not None for p in self.procs):
                    raise RuntimeError("a gateway or worker process exited while starting")
                await asyncio.sleep(0.1)
            raise TimeoutError(f"{n} llama workers did not register in {timeout_s:.0f} s")
        finally:
            await redis.aclose()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.procs.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


def write_section(mark: str, text: str, doc: str = DOC) -> None:
    """Put ``text`` (which starts with ``mark``) in place of the section that starts with
    ``mark`` and runs to the next ``<!-- ... -->`` marker line or the end; append it if absent."""
    path = Path(doc)
    old = path.read_text() if path.exists() else ""
    if mark in old:
        head, rest = old.split(mark, 1)
        nxt = rest.find("\n<!-- ")
        tail = rest[nxt + 1 :] if nxt >= 0 else ""
    else:
        head, tail = old.rstrip() + "\n\n", ""
    body = text.rstrip() + "\n"
    path.write_text(head + body + ("\n" + tail if tail else ""))
