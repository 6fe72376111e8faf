"""API keys: off by default, 401/403 with nothing enqueued, priority ceiling, the keys CLI,
and rate limits shared by two gateway processes through Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from typer.testing import CliRunner

from gateway.apikeys import create_key, revoke_key
from shared.jobs import JobStore
from shared.keys import Keys
from shared.models import Priority
from slipstream.cli import app as cli
from tests.helpers import (
    RedisProcess,
    free_port,
    gateway_settings,
    running_gateway,
    running_worker,
    wait_for_port,
    worker_settings,
)

CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


async def queued(redis: Redis) -> int:
    return sum([await redis.xlen(Keys().queue("sim-model", p)) for p in Priority.ordered()])


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
async def secured(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway with auth on and a worker."""
    gw = gateway_settings(redis_url, auth_required=True, models=["sim-model", "other"])
    async with (
        running_gateway(gw) as base,
        running_worker(worker_settings(redis_url)),
        httpx.AsyncClient(base_url=base, timeout=10) as http,
    ):
        yield http


async def test_auth_is_off_by_default(redis_url: str) -> None:
    async with running_gateway(gateway_settings(redis_url)) as base, httpx.AsyncClient() as c:
        response = await c.post(f"{base}/v1/jobs", json=CHAT)
        assert response.status_code == 202
        job = (await c.get(f"{base}/v1/jobs/{response.json()['id']}")).json()
    assert job["id"] == response.json()["id"]


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("sk-slip-nope"), {"Authorization": "Bearer"}, {"Authorization": "Basic abc"}],
    ids=["missing", "unknown", "empty", "not bearer"],
)
async def test_missing_or_invalid_key_is_401(
    secured: httpx.AsyncClient, redis: Redis, headers: dict[str, str]
) -> None:
    for method, path in [("POST", "/v1/chat/completions"), ("POST", "/v1/jobs")]:
        response = await secured.request(method, path, json=CHAT, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert (await secured.get("/v1/models", headers=headers)).status_code == 401
    assert await queued(redis) == 0


async def test_valid_key_then_revoked(secured: httpx.AsyncClient, redis: Redis) -> None:
    secret, record = await create_key(redis, Keys(), "acme")
    ok = await secured.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    assert ok.status_code == 200
    job_id = ok.headers["x-slipstream-job-id"]
    stored = await JobStore(redis, Keys(), ttl_s=60).load_job("sim-model", job_id)
    assert stored is not None and stored.tenant == "acme"
    assert (await secured.post("/v1/jobs", json=CHAT, headers={"api-key": secret})).is_success
    await revoke_key(redis, Keys(), record.id)
    before = await queued(redis)
    revoked = await secured.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    assert revoked.status_code == 401
    assert await queued(redis) == before


async def test_model_allowlist_and_priority_ceiling(
    secured: httpx.AsyncClient, redis: Redis
) -> None:
    secret, _ = await create_key(
        redis, Keys(), "team", models=["sim-model"], max_priority=Priority.NORMAL
    )
    denied = await secured.post("/v1/jobs", json={**CHAT, "model": "other"}, headers=bearer(secret))
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "model_not_allowed"
    models = (await secured.get("/v1/models", headers=bearer(secret))).json()["data"]
    assert [m["id"] for m in models] == ["sim-model"]
    high = await secured.post("/v1/jobs", json={**CHAT, "priority": "high"}, headers=bearer(secret))
    assert high.status_code == 202
    stored = await JobStore(redis, Keys(), ttl_s=60).load_job("sim-model", high.json()["id"])
    assert stored is not None and stored.priority == Priority.NORMAL  # lowered to the ceiling


def test_keys_cli_create_list_revoke(redis_server: RedisProcess) -> None:
    runner = CliRunner()
    env = {"REDIS_URL": redis_server.url}
    created = runner.invoke(
        cli, ["keys", "create", "--tenant", "acme", "--model", "m1", "--rpm", "5"], env=env
    )
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip().splitlines()[0]
    assert secret.startswith("sk-slip-") and len(secret) > 40
    listed = runner.invoke(cli, ["keys", "list"], env=env)
    assert listed.exit_code == 0 and secret not in listed.stdout
    line = next(x for x in listed.stdout.splitlines() if "acme" in x)
    assert "active" in line and "models=m1" in line and "rpm=5" in line
    key_id = line.split()[0]
    revoked = runner.invoke(cli, ["keys", "revoke", key_id], env=env)
    assert revoked.exit_code == 0 and key_id in revoked.stdout
    assert "revoked" in runner.invoke(cli, ["keys", "list"], env=env).stdout
    assert runner.invoke(cli, ["keys", "revoke", "zzzzzzzz"], env=env).exit_code == 1
    bad = runner.invoke(cli, ["keys", "create", "--tenant", "no spaces"], env=env)
    assert bad.exit_code != 0


# --- rate limits across two gateway processes ----------------------------------------------


@contextlib.contextmanager
def gateway_process(redis_url: str) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "SLIPSTREAM_AUTH_REQUIRED": "true",
        "SLIPSTREAM_MODELS": "sim-model",
        "SLIPSTREAM_LOG_LEVEL": "warning",
    }
    args = [sys.executable, "-m", "slipstream", "gateway", "--port", str(port)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.fixture
def two_gateways(redis_server: RedisProcess) -> Iterator[tuple[str, str]]:
    with gateway_process(redis_server.url) as a, gateway_process(redis_server.url) as b:
        yield a, b


async def submit(base: str, secret: str, **body: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as c:
        return await c.post(f"{base}/v1/jobs", json={**CHAT, **body}, headers=bearer(secret))


async def test_requests_per_minute_shared_by_two_gateways(
    two_gateways: tuple[str, str], redis_url: str, redis: Redis
) -> None:
    a, b = two_gateways
    secret, _ = await create_key(redis, Keys(), "limited", rpm=4)
    other, _ = await create_key(redis, Keys(), "other", rpm=4)
    statuses = [(await submit(base, secret)).status_code for base in (a, b, a, b)]
    assert statuses == [202] * 4
    refused = await submit(b, secret)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-limit-requests"] == "4"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert await queued(redis) == 4  # the refused request left nothing
    assert (await submit(a, other)).status_code == 202  # another key has its own budget


async def test_tokens_per_minute_shared_by_two_gateways(
    two_gateways: tuple[str, str], redis: Redis
) -> None:
    a, b = two_gateways
    secret, _ = await create_key(redis, Keys(), "tokens", tpm=100)
    first = await submit(a, secret, max_tokens=40)  # costs 45 (prompt estimate 5 + 40)
    assert first.status_code == 202
    second = await submit(b, secret, max_tokens=40)
    assert second.status_code == 202
    third = await submit(a, secret, max_tokens=40)
    assert third.status_code == 429
    assert third.headers["x-ratelimit-limit-tokens"] == "100"
    assert int(third.headers["x-ratelimit-remaining-tokens"]) < 40
    assert (await submit(b, secret, max_tokens=5)).status_code == 202  # what is left still fits
    assert await queued(redis) == 3


async def test_rate_headers_on_success(redis_url: str, redis: Redis) -> None:
    gw = gateway_settings(redis_url, auth_required=True)
    secret, _ = await create_key(redis, Keys(), "acme", rpm=10, tpm=1000)
    async with (
        running_gateway(gw) as base,
        running_worker(worker_settings(redis_url)),
        httpx.AsyncClient(base_url=base, timeout=10) as c,
    ):
        response = await c.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        await asyncio.sleep(0)
    assert response.status_code == 200
    assert response.headers["x-ratelimit-limit-requests"] == "10"
    assert response.headers["x-ratelimit-remaining-requests"] == "9"
    assert response.headers["x-ratelimit-limit-tokens"] == "1000"
    assert response.headers["x-ratelimit-remaining-tokens"] == str(1000 - 13)  # 5 + 8 tokens


async def test_key_hashes_only_in_redis(redis: Redis) -> None:
    secret, record = await create_key(redis, Keys(), "acme")
    stored = await redis.hgetall(Keys().api_key(record.key_hash))  # type: ignore[misc]
    assert secret not in str(stored) and len(record.key_hash) == 64
    assert secret[8:] not in str(await redis.smembers(Keys().api_keys))  # type: ignore[misc]
