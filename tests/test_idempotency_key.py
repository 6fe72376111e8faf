"""``Idempotency-Key`` is bound to a job only once the job is in Redis (issue 12).

A submission whose enqueue fails (503, "retry") frees its key, so the client's retry is
submitted instead of meeting 409 for the key's TTL; a key reused with a different body is 422
(``idempotency_key_mismatch``), as in Stripe's API and the IETF Idempotency-Key draft. The
enqueue fails for real: the model's queue key holds a string, so ``ENQUEUE``'s ``XADD`` gets
WRONGTYPE from Redis.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis

from shared.keys import Keys
from shared.models import Priority
from tests.helpers import gateway_settings, running_gateway, running_worker, worker_settings

CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
OTHER = {**CHAT, "messages": [{"role": "user", "content": "something else"}]}
QUEUE = Keys().queue("sim-model", Priority.NORMAL)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = worker_settings(redis_url, sim_tokens_per_s=200.0)
    async with (
        running_gateway(gateway_settings(redis_url)) as base,
        running_worker(settings),
        httpx.AsyncClient(base_url=base, timeout=10) as http,
    ):
        yield http


async def break_queue(redis: Redis) -> None:
    await redis.delete(QUEUE)
    await redis.set(QUEUE, "not a stream")  # ENQUEUE's XADD now fails with WRONGTYPE


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/chat/completions"])
async def test_a_failed_enqueue_frees_the_key(
    client: httpx.AsyncClient, redis: Redis, path: str
) -> None:
    headers = {"Idempotency-Key": f"order-{path}"}
    await break_queue(redis)
    failed = await client.post(path, json=CHAT, headers=headers)
    assert failed.status_code == 503, failed.text
    await redis.delete(QUEUE)  # Redis is fine again: the client retries with the same key
    retried = await client.post(path, json=CHAT, headers=headers)
    assert retried.status_code in (200, 202), retried.text
    job_id = retried.headers["x-slipstream-job-id"]
    again = await client.post(path, json=CHAT, headers=headers)  # now bound: the same job
    assert again.status_code == 200 and again.headers["x-slipstream-job-id"] == job_id


async def test_a_different_body_with_the_same_key_is_422(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "order-7"}
    first = await client.post("/v1/jobs", json=CHAT, headers=headers)
    assert first.status_code == 202
    other = await client.post("/v1/jobs", json=OTHER, headers=headers)
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_mismatch"
    chat = await client.post("/v1/chat/completions", json=OTHER, headers=headers)
    assert chat.status_code == 422
    same = await client.post("/v1/jobs", json=CHAT, headers=headers)
    assert same.status_code == 200 and same.json()["id"] == first.json()["id"]


async def test_a_key_still_being_submitted_is_409_until_it_is_stale(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    name = Keys().idempotency("anonymous", "order-9")
    # another request bound the key a moment ago and is still enqueueing its job
    now = int(time.time() * 1000)
    await redis.set(name, json.dumps({"job": "in-flight", "at": now}), ex=600)
    busy = await client.post("/v1/jobs", json=CHAT, headers={"Idempotency-Key": "order-9"})
    assert busy.status_code == 409
    # its enqueue failed long ago and it could not free the key (Redis was down): taken over
    await redis.set(name, json.dumps({"job": "failed", "at": now - 120_000}), ex=600)
    taken = await client.post("/v1/jobs", json=CHAT, headers={"Idempotency-Key": "order-9"})
    assert taken.status_code == 202
    assert json.loads(await redis.get(name))["job"] == taken.json()["id"]


async def test_a_bad_header_refused_after_the_gates_leaves_the_key_free(
    client: httpx.AsyncClient,
) -> None:
    """``X-Cancel-On-Disconnect`` is checked before the key is bound: the corrected retry is
    submitted, not held up by a key bound to a job that was never queued."""
    headers = {"Idempotency-Key": "order-header"}
    bad = await client.post(
        "/v1/chat/completions", json=CHAT, headers={**headers, "X-Cancel-On-Disconnect": "maybe"}
    )
    assert bad.status_code == 400 and "X-Cancel-On-Disconnect" in bad.text
    good = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert good.status_code == 200, good.text
    assert good.json()["choices"][0]["finish_reason"] == "length"
