"""``/v1/chat/completions`` and ``/v1/completions`` through the official openai SDK."""

from __future__ import annotations

import openai
import pytest

from tests.helpers import gateway_settings, running_gateway, running_worker, worker_settings


@pytest.fixture
async def stack(redis_url: str):  # type: ignore[no-untyped-def]
    async with (
        running_gateway(gateway_settings(redis_url)) as base,
        running_worker(worker_settings(redis_url)),
    ):
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        yield client
        await client.close()


async def test_streaming_chat(stack: openai.AsyncOpenAI) -> None:
    stream = await stack.chat.completions.create(
        model="sim-model",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    content = [c.choices[0].delta for c in chunks if c.choices]
    assert content[0].role == "assistant"
    text = "".join(d.content or "" for d in content)
    assert len(text.split()) == 12
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


async def test_non_streaming_chat_matches_streaming(stack: openai.AsyncOpenAI) -> None:
    args = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    full = await stack.chat.completions.create(**args, temperature=0)  # type: ignore[call-overload]
    stream = await stack.chat.completions.create(**args, temperature=0, stream=True)  # type: ignore[call-overload]
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert full.choices[0].message.content == streamed
    assert full.usage is not None and full.usage.completion_tokens == 8
    assert full.choices[0].finish_reason == "length"


async def test_completions_stop_sequence(stack: openai.AsyncOpenAI) -> None:
    first = await stack.completions.create(model="sim-model", prompt="abc", max_tokens=10)
    words = first.choices[0].text.split()
    stop = " " + words[3]
    cut = await stack.completions.create(model="sim-model", prompt="abc", max_tokens=10, stop=stop)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == first.choices[0].text[: first.choices[0].text.index(stop)]


async def test_unknown_model_is_404(stack: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        await stack.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )
    assert err.value.code == "model_not_found"


async def test_n_2_is_400(stack: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await stack.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "x"}], n=2
        )
    assert err.value.param == "n"


async def test_models_lists_live_workers(stack: openai.AsyncOpenAI) -> None:
    models = await stack.models.list()
    assert [m.id for m in models.data] == ["sim-model"]
