"""One request id from the client's ``X-Request-Id`` through the gateway's and the worker's logs.

Runs the real entry points (``python -m slipstream gateway|worker``) with JSON logs, so what is
checked is the production logging setup: one JSON object per line, ``request_id`` in both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import structlog

from gateway.app import create_app
from tests.helpers import free_port, gateway_settings, running_app, wait_for_port


def json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


async def test_request_id_reaches_worker_logs(redis_url: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "SLIPSTREAM_LOG_FORMAT": "json",
        "SLIPSTREAM_LOG_LEVEL": "info",
        "SLIPSTREAM_HEARTBEAT_S": "0.2",
    }
    port = free_port()
    cli = [sys.executable, "-m", "slipstream"]
    logs = {name: tmp_path / f"{name}.log" for name in ("gateway", "worker")}
    args = {
        "gateway": [*cli, "gateway", "--port", str(port), "--model", "sim-model"],
        "worker": [*cli, "worker", "--engine", "sim", "--model", "sim-model"],
    }
    procs = []
    try:
        for name in ("gateway", "worker"):
            with logs[name].open("wb") as sink:
                procs.append(subprocess.Popen(args[name], env=env, stdout=sink, stderr=sink))
        wait_for_port(port, 20)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            body = {"model": "sim-model", "prompt": "trace me", "max_tokens": 4}
            given = await client.post(
                "/v1/completions", json=body, headers={"X-Request-Id": "client-trace-42"}
            )
            made = await client.post("/v1/completions", json=body)
        assert given.status_code == 200 and made.status_code == 200
        assert given.headers["x-request-id"] == "client-trace-42"
        generated = made.headers["x-request-id"]
    finally:
        for proc in reversed(procs):
            stop(proc)

    worker = json_lines(logs["worker"])
    gateway = json_lines(logs["gateway"])
    for request_id in ("client-trace-42", generated):
        done = [e for e in worker if e.get("request_id") == request_id]
        assert [e["event"] for e in done] == ["job_completed"], worker
        assert done[0]["logger"] == "slipstream.worker" and done[0]["level"] == "info"
        finished = [e for e in gateway if e.get("request_id") == request_id]
        assert [e["event"] for e in finished] == ["request_finished"], gateway
        assert finished[0]["outcome"] == "completed"
        assert finished[0]["job_id"] == done[0]["job_id"]


async def test_gateway_binds_request_id_per_request(redis_url: str) -> None:
    """The middleware binds a valid X-Request-Id for the request only, nothing leaks after."""
    settings = gateway_settings(redis_url)
    app = create_app(settings)

    @app.get("/test/log-context")
    async def log_context() -> dict[str, Any]:
        return structlog.contextvars.get_contextvars()

    async with running_app(app, settings.port) as base, httpx.AsyncClient(base_url=base) as c:
        bound = await c.get("/test/log-context", headers={"X-Request-Id": "abc-1"})
        assert bound.json() == {"request_id": "abc-1"}
        assert (await c.get("/test/log-context")).json() == {}  # same connection, next request
        bad = await c.get("/test/log-context", headers={"X-Request-Id": "no spaces!"})
        assert bad.json() == {}
