"""The real Gemma 3 270M model through gateway and llama workers, with the openai SDK."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import openai
import pytest
from redis.asyncio import Redis

from shared.keys import Keys
from tests.helpers import gateway_settings, running_gateway, running_worker, worker_settings
from worker.service import Worker

pytestmark = pytest.mark.llama
MODEL = "gemma-3-270m"
PROMPT = "The three primary colors are"


def llama_settings(redis_url: str, worker_id: str):  # type: ignore[no-untyped-def]
    return worker_settings(
        redis_url,
        model=MODEL,
        engine="llama",
        slots=1,
        threads=1,
        n_ctx=512,
        worker_id=worker_id,
    )


@pytest.fixture
async def stack(redis_url: str) -> AsyncIterator[tuple[openai.AsyncOpenAI, list[Worker]]]:
    async with (
        running_gateway(gateway_settings(redis_url, models=[MODEL])) as base,
        running_worker(llama_settings(redis_url, "llama-a")) as a,
        running_worker(llama_settings(redis_url, "llama-b")) as b,
    ):
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        yield client, [a, b]
        await client.close()


async def test_sdk_streams_real_text(stack: tuple[openai.AsyncOpenAI, list[Worker]]) -> None:
    client, _ = stack
    stream = await client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.strip(), "the model produced no text"
    assert chunks[-1].usage is not None and 0 < chunks[-1].usage.completion_tokens <= 16


async def test_greedy_output_is_the_same_on_both_workers(
    stack: tuple[openai.AsyncOpenAI, list[Worker]], redis: Redis
) -> None:
    client, _ = stack

    async def ask() -> tuple[str, str]:
        response = await client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Name a fruit."}],
            max_tokens=12,
            temperature=0,
        )
        job_id = response.headers["x-slipstream-job-id"]
        owner = await redis.hget(Keys().job(MODEL, job_id), "owner")
        return response.parse().choices[0].message.content or "", str(owner)

    (text_a, owner_a), (text_b, owner_b) = await asyncio.gather(ask(), ask())
    assert owner_a != owner_b, "each worker has one slot, so each took one request"
    assert text_a == text_b and text_a


async def test_cancel_frees_the_slot(stack: tuple[openai.AsyncOpenAI, list[Worker]]) -> None:
    client, workers = stack
    stream = await client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=200, temperature=0, stream=True
    )
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    await stream.close()
    for _ in range(200):
        if all(w.capacity.seqs_in_use == 0 for w in workers):
            break
        await asyncio.sleep(0.01)
    assert all(w.capacity.seqs_in_use == 0 for w in workers)
