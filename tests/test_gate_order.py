"""Who may enforce what: a request refused by its rate limit is not counted as admitted, and
only the submitting request fails a job for want of a live worker (not a watcher)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from redis.asyncio import Redis

from gateway.apikeys import create_key
from gateway.app import create_app
from shared.keys import Keys
from shared.models import Priority
from tests.helpers import (
    free_port,
    gateway_settings,
    running_app,
    running_worker,
    worker_settings,
)

CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


async def test_rate_limited_requests_are_not_counted_as_admitted(
    redis_url: str, redis: Redis
) -> None:
    settings = gateway_settings(redis_url, auth_required=True, models=["sim-model"])
    app = create_app(settings)
    secret, _ = await create_key(redis, Keys(), "noisy", rpm=1)
    async with running_app(app, free_port()) as base, httpx.AsyncClient(base_url=base) as c:
        headers = {"Authorization": f"Bearer {secret}"}
        statuses = [
            (await c.post("/v1/jobs", json=CHAT, headers=headers)).status_code for _ in range(5)
        ]
        assert statuses == [202, 429, 429, 429, 429]
        admission = app.state.gateway.admission
        one_job = 5 + 8  # the prompt estimate and max_tokens
        inflow = admission.inflow("sim-model", Priority.NORMAL) * 5.0  # over its 5 s window
        assert inflow == pytest.approx(one_job)


async def test_watching_a_job_never_fails_it_for_want_of_a_worker(redis_url: str) -> None:
    settings = gateway_settings(redis_url, models=["sim-model"], worker_wait_s=0.3)
    app = create_app(settings)
    async with (
        running_app(app, free_port()) as base,
        httpx.AsyncClient(base_url=base, timeout=15) as c,
    ):
        job = (await c.post("/v1/jobs", json=CHAT)).json()["id"]  # no worker is live

        async def watch() -> str:
            async with c.stream("GET", f"/v1/jobs/{job}/events") as response:
                return "".join([line async for line in response.aiter_lines()])

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(1.0)  # well past the worker wait
        assert not watcher.done()
        assert (await c.get(f"/v1/jobs/{job}")).json()["status"] == "queued"
        async with running_worker(worker_settings(redis_url)):
            seen = await asyncio.wait_for(watcher, 10)
    assert "no_worker_available" not in seen
    assert '"finish_reason":"length"' in seen and seen.endswith("data: [DONE]")
