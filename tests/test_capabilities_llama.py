"""The llama engine's features with the real Gemma 3 270M model, through gateway and worker,
with the openai SDK: ``response_format`` json_schema (a llama.cpp grammar), logprobs, and the
sampler's features against its plain path."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator

import jsonschema_rs
import numpy as np
import openai
import pytest

from tests.helpers import gateway_settings, running_gateway, running_worker, worker_settings
from worker.engines.llama_sampling import Sampler, SamplingSpec

pytestmark = [pytest.mark.llama, pytest.mark.timeout(300)]
MODEL = "gemma-3-270m"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "colors": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "colors"],
    "additionalProperties": False,
}


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    settings = worker_settings(
        redis_url, model=MODEL, engine="llama", slots=2, threads=2, n_ctx=1024
    )
    async with (
        running_gateway(gateway_settings(redis_url, models=[MODEL])) as base,
        running_worker(settings),
    ):
        sdk = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        yield sdk
        await sdk.close()


async def test_json_schema_answer_validates(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a person called Ada who likes colors."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
        },
        max_tokens=120,
        temperature=0,
    )
    text = reply.choices[0].message.content or ""
    assert reply.choices[0].finish_reason == "stop", text  # the grammar closed the object
    jsonschema_rs.validate(SCHEMA, json.loads(text))


async def test_json_object_streamed_and_sampled(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
        response_format={"type": "json_object"},
        max_tokens=150,
        temperature=0.8,
        seed=3,
        extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1},
        stream=True,
    )
    text, finish = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    if finish == "stop":
        assert isinstance(json.loads(text), dict), text
    else:  # cut by max_tokens: still a prefix the grammar allowed
        assert text.lstrip().startswith("{"), text


async def test_logprobs_are_the_models(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == choice.message.content
    for e in entries:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert math.isclose(e.logprob, e.top_logprobs[0].logprob, abs_tol=1e-5)


def test_sampler_features_change_the_draw_deterministically() -> None:
    """Unit level, no model: same seed and spec give the same tokens; top_k=1 is greedy;
    a large negative logit_bias removes the argmax; one draw per token (skip) still holds."""
    logits = np.random.default_rng(0).normal(size=500).astype(np.float32)
    spec = SamplingSpec(top_k=20, min_p=0.05, repetition_penalty=1.2, presence_penalty=0.5)
    a = Sampler(0.9, 0.95, 11, spec=spec, prompt=[1, 2])
    b = Sampler(0.9, 0.95, 11, spec=spec, prompt=[1, 2])
    first = [a(logits) for _ in range(8)]
    assert first == [b(logits) for _ in range(8)]
    greedy = Sampler(1.0, 1.0, 5, spec=SamplingSpec(top_k=1))
    assert greedy(logits) == int(np.argmax(logits))
    top = int(np.argmax(logits))
    biased = Sampler(0.0, 1.0, None, spec=SamplingSpec(bias=((top, -100.0),)))
    assert biased(logits) != top
    resumed = Sampler(0.9, 0.95, 11, skip=3, spec=spec, prompt=[1, 2], produced=first[:3])
    assert [resumed(logits) for _ in range(5)] == first[3:]
