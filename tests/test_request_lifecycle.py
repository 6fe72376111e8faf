"""Deadlines, cancellation on disconnect, and no-worker handling, through the gateway."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from redis.asyncio import Redis

from shared.jobs import JobStore
from shared.keys import Keys
from shared.models import Priority
from tests.helpers import (
    gateway_settings,
    make_job,
    running_gateway,
    running_worker,
    worker_settings,
)
from worker.service import Worker

BODY = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}


async def busy_stack_request(base: str, headers: dict[str, str], **body: object) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        return await client.post("/v1/chat/completions", json={**BODY, **body}, headers=headers)


async def until_running(worker: Worker, timeout: float = 5.0) -> None:
    """Until ``worker`` runs a job (a fixed sleep was not always enough on a loaded machine:
    the job behind the blocker was then served first)."""
    end = time.monotonic() + timeout
    while not worker.running:
        assert time.monotonic() < end, "the blocker never started"
        await asyncio.sleep(0.01)


async def test_deadline_passes_while_queued_is_504(redis: Redis, redis_url: str) -> None:
    settings = worker_settings(redis_url, max_seqs=1, sim_tokens_per_s=20.0)
    async with running_gateway(gateway_settings(redis_url)) as base, running_worker(settings) as w:
        blocker = asyncio.create_task(busy_stack_request(base, {}, max_tokens=40))
        await until_running(w)
        began = time.monotonic()
        late = await busy_stack_request(base, {"X-Deadline-Ms": "300"}, max_tokens=5)
        assert late.status_code == 504
        # answered at its deadline, not at the next once-a-second check (up to 2 s late before)
        assert time.monotonic() - began < 1.0
        assert late.json()["error"]["code"] == "deadline_exceeded"
        job_id = late.headers["x-slipstream-job-id"]
        store = JobStore(redis, Keys(), ttl_s=60)
        assert (await store.state("sim-model", job_id))["state"] == "expired"
        assert (await blocker).status_code == 200
        await asyncio.sleep(0.1)
        entries = await store.read_log("sim-model", job_id)
        assert [e.t for entry in entries for e in entry.batch.events] == ["error"]  # never started


async def test_deadline_while_streaming_sends_error_event(redis_url: str) -> None:
    settings = worker_settings(redis_url, max_seqs=1, sim_tokens_per_s=20.0)
    gw = gateway_settings(redis_url, stream_start_s=0.05)
    async with running_gateway(gw) as base, running_worker(settings) as w:
        blocker = asyncio.create_task(busy_stack_request(base, {}, max_tokens=20))
        await until_running(w)
        async with (
            httpx.AsyncClient(base_url=base, timeout=10) as client,
            client.stream(
                "POST",
                "/v1/chat/completions",
                json={**BODY, "stream": True, "max_tokens": 5},
                headers={"X-Deadline-Ms": "400"},
            ) as response,
        ):
            assert response.status_code == 200
            lines = [line async for line in response.aiter_lines() if line.startswith("data:")]
        assert json.loads(lines[-2][5:])["error"]["code"] == "deadline_exceeded"
        assert lines[-1] == "data: [DONE]"
        await blocker


async def test_client_disconnect_cancels_generation(redis: Redis, redis_url: str) -> None:
    settings = worker_settings(redis_url, sim_tokens_per_s=50.0)
    async with running_gateway(gateway_settings(redis_url)) as base, running_worker(settings) as w:
        async with (
            httpx.AsyncClient(base_url=base, timeout=10) as client,
            client.stream(
                "POST", "/v1/chat/completions", json={**BODY, "stream": True, "max_tokens": 500}
            ) as response,
        ):
            job_id = response.headers["x-slipstream-job-id"]
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("data:")
                if seen == 3:
                    break
        store = JobStore(redis, Keys(), ttl_s=60)
        for _ in range(100):
            if w.capacity.seqs_in_use == 0:
                break
            await asyncio.sleep(0.01)
        assert w.capacity.seqs_in_use == 0 and w.capacity.tokens_in_use == 0
        state = await store.state("sim-model", job_id)
        assert state["state"] == "cancelled"
        assert int(state["ntok"]) < 20  # stopped within a few tokens of the disconnect


async def test_non_streaming_disconnect_cancels(redis: Redis, redis_url: str) -> None:
    settings = worker_settings(redis_url, sim_tokens_per_s=50.0)
    async with running_gateway(gateway_settings(redis_url)) as base, running_worker(settings) as w:
        with_timeout = httpx.AsyncClient(base_url=base, timeout=0.5)
        try:
            await with_timeout.post("/v1/chat/completions", json={**BODY, "max_tokens": 500})
        except httpx.ReadTimeout:
            pass
        finally:
            await with_timeout.aclose()
        for _ in range(100):
            if w.capacity.seqs_in_use == 0:
                break
            await asyncio.sleep(0.01)
        assert w.capacity.seqs_in_use == 0


async def test_known_model_without_worker_waits_then_503(redis: Redis, redis_url: str) -> None:
    gw = gateway_settings(redis_url, worker_wait_s=0.5)
    async with running_gateway(gw) as base:
        response = await busy_stack_request(base, {}, max_tokens=5)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_worker_available"
    assert await redis.xlen(Keys().queue("sim-model", Priority.NORMAL)) == 0


async def test_job_waits_for_a_worker_that_arrives(redis_url: str) -> None:
    gw = gateway_settings(redis_url, worker_wait_s=5.0)
    async with running_gateway(gw) as base:
        request = asyncio.create_task(busy_stack_request(base, {}, max_tokens=5))
        await asyncio.sleep(0.5)
        async with running_worker(worker_settings(redis_url)):
            response = await request
    assert response.status_code == 200
    assert response.headers["x-request-id"]


async def test_a_queued_job_outlives_the_log_ttl_until_its_deadline(redis: Redis) -> None:
    """State and index live for the job's whole time budget, not only the log TTL."""
    store = JobStore(redis, Keys(), ttl_s=1)
    job = make_job(deadline_ms=60_000)
    await store.enqueue(job)
    await asyncio.sleep(1.2)  # past the log TTL, far from the deadline
    assert await store.job_state(job.model, job.id) == "queued"
    assert await store.model_of(job.id) == job.model
    assert await redis.pttl(Keys().job(job.model, job.id)) > 55_000
