"""The relay takes a pub/sub batch only from the job's current claim (its fence): a batch
published straight into a job's channel by anyone else (a forger with SPUBLISH rights, a
stale worker whose lease was taken over) never reaches the client, and the real output
arrives once, in order. The test plays the workers with ``JobStore`` against real Redis and
a real gateway; the forger is a plain ``SPUBLISH``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from shared.jobs import Claimed, JobStore
from shared.keys import Keys
from shared.models import DoneEvent, EventBatch, JobState, StartedEvent, TokenEvent, Usage
from tests.helpers import gateway_settings, running_gateway

MODEL = "sim-model"
PULL: dict[str, Any] = {"free_tokens": 10_000, "idle": True, "aging_ms": {}, "max_deliveries": 5}


@pytest.fixture
async def base(redis_url: str) -> AsyncIterator[str]:
    settings = gateway_settings(redis_url, worker_wait_s=60.0, sse_ping_s=60.0)
    async with running_gateway(settings) as url:
        yield url


async def claim(store: JobStore, worker: str, lease_ms: int = 60_000) -> Claimed:
    for _ in range(200):  # bounded: 10 s
        taken = await store.pull(MODEL, worker, lease_ms=lease_ms, **PULL)
        if taken.claimed is not None:
            return taken.claimed
        await asyncio.sleep(0.05)
    raise AssertionError("the job was never queued")


async def stream_text(http: httpx.AsyncClient, body: dict[str, Any]) -> str:
    parts = []
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:]).get("choices", []):
                    parts.append(choice.get("text", ""))
    return "".join(parts)


def forged(seq: int, fence: int | None) -> str:
    batch: dict[str, Any] = {"v": 1, "events": [{"t": "token", "s": seq, "x": " FORGED"}]}
    if fence is not None:
        batch["f"] = fence
    return json.dumps(batch)


async def finish(store: JobStore, claimed: Claimed, seq: int, text: str) -> None:
    usage = Usage(prompt_tokens=2, completion_tokens=seq)
    events = [TokenEvent(s=seq, x=text), DoneEvent(s=seq + 1, finish_reason="stop", usage=usage)]

    ok = await store.emit(
        claimed, EventBatch(events=events), new_tokens=1, terminal=JobState.COMPLETED
    )
    assert ok


@pytest.mark.parametrize("fence", [None, 0, 2, 7], ids=["no-fence", "old", "next", "made-up"])
async def test_a_forged_batch_is_not_spliced_into_a_stream(
    base: str, redis: Redis, fence: int | None
) -> None:
    store = JobStore(redis, Keys(), ttl_s=600)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream": True}
    async with httpx.AsyncClient(base_url=base, timeout=20) as http:
        reading = asyncio.create_task(stream_text(http, body))
        claimed = await claim(store, "w1")

        first = [StartedEvent(s=0, worker="w1"), TokenEvent(s=1, x=" one")]
        assert await store.emit(claimed, EventBatch(events=first), new_tokens=1)
        await asyncio.sleep(0.2)
        channel = Keys().job_channel(MODEL, claimed.job.id)
        assert await redis.spublish(channel, forged(2, fence)) == 1  # the gateway listens
        await asyncio.sleep(0.3)
        await finish(store, claimed, 2, " two")
        text = await asyncio.wait_for(reading, 20)
    assert text == " one two"


async def test_a_stale_workers_batch_is_not_spliced_after_a_takeover(
    base: str, redis: Redis
) -> None:
    store = JobStore(redis, Keys(), ttl_s=600)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream": True}
    async with httpx.AsyncClient(base_url=base, timeout=20) as http:
        reading = asyncio.create_task(stream_text(http, body))

        old = await claim(store, "w1", lease_ms=300)
        first = [StartedEvent(s=0, worker="w1"), TokenEvent(s=1, x=" one")]
        assert await store.emit(old, EventBatch(events=first), new_tokens=1)
        await asyncio.sleep(0.5)  # w1's lease ends (it stalled); w2 takes the job over
        new = await claim(store, "w2")
        assert new.fence == old.fence + 1
        started = EventBatch(events=[StartedEvent(s=1, worker="w2")])
        assert await store.emit(new, started, new_tokens=0)
        await asyncio.sleep(0.3)
        # w1 wakes up and publishes past EMIT (which would refuse it): its old fence
        channel = Keys().job_channel(MODEL, old.job.id)
        assert await redis.spublish(channel, forged(2, old.fence)) == 1
        await asyncio.sleep(0.3)
        await finish(store, new, 2, " two")
        text = await asyncio.wait_for(reading, 20)
    assert text == " one two"
