"""What real clients send that does not change generation is accepted; vLLM's dialect where
clients rely on it (``continuous_usage_stats``, ``/health``, ``models.retrieve`` with
``max_model_len``). Through the official openai SDK and plain HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.helpers import gateway_settings, running_gateway, running_worker, worker_settings


@pytest.fixture
async def base(redis_url: str):  # type: ignore[no-untyped-def]
    async with (
        running_gateway(gateway_settings(redis_url)) as url,
        running_worker(worker_settings(redis_url, context_tokens=4096)),
    ):
        yield url


async def test_neutral_fields_are_accepted(base: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    try:
        reply = await client.chat.completions.create(
            model="sim-model",
            messages=[{"role": "user", "content": "hello"}],
            max_completion_tokens=5,
            metadata={"team": "search"},
            store=False,
            user="u-1",
            service_tier="auto",
            safety_identifier="hashed-user",
            prompt_cache_key="conversation-9",
            parallel_tool_calls=False,
            logprobs=False,
            n=1,
            presence_penalty=0,
            frequency_penalty=0,
        )
    finally:
        await client.close()
    assert reply.usage is not None and reply.usage.completion_tokens == 5


async def test_fields_that_change_output_are_still_refused(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        body = {"model": "sim-model", "messages": [{"role": "user", "content": "x"}]}
        response = await client.post("/v1/chat/completions", json={**body, "top_k": 5})
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "top_k"
        response = await client.post("/v1/chat/completions", json={**body, "metadata": [1]})
        assert response.status_code == 400


async def test_continuous_usage_stats_on_every_chunk(base: str) -> None:
    body = {
        "model": "sim-model",
        "prompt": "count with me",
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    chunks = []
    async with (
        httpx.AsyncClient(base_url=base, timeout=10) as client,
        client.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunks.append(httpx.Response(200, content=line[6:]).json())
    with_text = [c for c in chunks if c["choices"] and c["choices"][0]["text"]]
    assert len(with_text) == 6
    assert [c["usage"]["completion_tokens"] for c in with_text] == [1, 2, 3, 4, 5, 6]
    prompt = with_text[0]["usage"]["prompt_tokens"]
    assert prompt > 0 and all(c["usage"]["prompt_tokens"] == prompt for c in with_text)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


async def test_health_and_model_retrieval(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        assert (await client.get("/health")).status_code == 200
        missing = await client.get("/v1/models/no-such-model")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    try:
        model = await client.models.retrieve("sim-model")
        listed = await client.models.list()
    finally:
        await client.close()
    assert model.id == "sim-model"
    assert model.model_extra is not None and model.model_extra["max_model_len"] == 4096
    assert [m.id for m in listed.data] == ["sim-model"]
