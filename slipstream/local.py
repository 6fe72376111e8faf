"""``slipstream up``: Redis (when none answers), one gateway and workers, as child processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from urllib.parse import urlparse

from shared.redis import connect
from shared.settings import CommonSettings, is_cluster_url, parse_sentinel_url


async def _redis_answers(url: str) -> bool:
    redis = connect(url, socket_timeout=1.0)
    try:
        return bool(await asyncio.wait_for(redis.ping(), 2.0))
    except Exception:
        return False
    finally:
        await redis.aclose()


def _start_redis(url: str) -> subprocess.Popen[bytes]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    parsed = urlparse(url)
    port = parsed.port or 6379
    args = [server, "--port", str(port), "--bind", parsed.hostname or "127.0.0.1"]
    args += ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
    args += ["--dir", os.path.abspath(".slipstream-redis")]
    os.makedirs(".slipstream-redis", exist_ok=True)
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, start_new_session=True)


def _wait_http(port: int, timeout: float) -> bool:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def _banner(port: int, model: str) -> str:
    return f"""
Slipstream is up: gateway http://127.0.0.1:{port}/v1  model {model}

  curl -N http://127.0.0.1:{port}/v1/chat/completions \\
    -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "stream": true, "max_tokens": 32,
         "messages": [{{"role": "user", "content": "Tell me about queues."}}]}}'

  slipstream status     # queues and workers
Press Ctrl-C to stop.
"""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_local(engine: str, model: str, port: int, workers: int, gateway_processes: int = 1) -> int:
    # SIGTERM stops everything like Ctrl-C; SIGINT too even when it came in ignored (a shell
    # starts background jobs with SIGINT ignored, and Python then leaves it so)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    settings = CommonSettings()
    env = {
        **os.environ,
        "SLIPSTREAM_LOG_FORMAT": os.environ.get("SLIPSTREAM_LOG_FORMAT", "console"),
    }
    children: list[subprocess.Popen[bytes]] = []
    if not asyncio.run(_redis_answers(settings.redis_url)):
        if parse_sentinel_url(settings.redis_url) is not None:  # not ours to start
            raise SystemExit(
                f"no Redis master answers through the sentinels of {settings.redis_url}"
            )
        if is_cluster_url(settings.redis_url):
            raise SystemExit(f"no node of the Redis Cluster {settings.redis_url} answers")
        children.append(_start_redis(settings.redis_url))
        if not asyncio.run(_wait_redis(settings.redis_url, 10.0)):
            _stop(children)
            raise SystemExit(f"redis-server did not start at {settings.redis_url}")
    cli = [sys.executable, "-m", "slipstream"]
    gw = [*cli, "gateway", "--port", str(port), "--model", model]
    gw += ["--processes", str(gateway_processes)]
    # own sessions: a terminal's Ctrl-C reaches only us, and we stop the children in order
    children.append(subprocess.Popen(gw, env=env, start_new_session=True))
    for _ in range(workers):
        worker = [*cli, "worker", "--engine", engine, "--model", model]
        children.append(subprocess.Popen(worker, env=env, start_new_session=True))
    try:
        if not _wait_http(port, 60.0):
            print("the gateway did not become ready", file=sys.stderr)
            return 1
        print(_banner(port, model), flush=True)
        while all(c.poll() is None for c in children):
            time.sleep(0.5)
        print("a child process exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        # a second Ctrl-C (or SIGTERM) while stopping must not leave children running:
        # the stop is bounded anyway (15 s per child, then SIGKILL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stopping: workers drain first, then the gateway and Redis", file=sys.stderr)
        _stop(children)


async def _wait_redis(url: str, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await _redis_answers(url):
            return True
        await asyncio.sleep(0.1)
    return False


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM in reverse order of start, one at a time: workers drain and leave the registry
    while the gateway and Redis still answer; SIGKILL for anything that takes over 15 s."""
    for child in reversed(children):
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
        try:
            child.wait(15.0)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
