"""Capabilities end to end: real gateway, real workers, Redis, and ``slipstream sim-server``
playing an upstream that sends tool calls and logprobs; clients are the openai SDK and httpx.

A ``sim`` worker implements no feature, an ``openai`` worker in front of the sim-server
implements what vLLM does: feature requests go only to the latter, and a feature no live
worker has is a 400 naming its parameter.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from redis.asyncio import Redis

from shared.capabilities import Feature, Features, to_bits
from shared.jobs import JobStore
from shared.keys import Keys
from shared.models import JobState, Priority
from tests.helpers import (
    free_port,
    gateway_settings,
    make_job,
    running_app,
    running_gateway,
    running_worker,
    worker_settings,
)
from worker.engines.sim import SimProfile
from worker.sim_server import SimServer

pytestmark = pytest.mark.timeout(60)
MSG = [{"role": "user", "content": "what is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "celsius": {"type": "boolean"}},
            "required": ["city", "celsius"],
        },
    },
}


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    """The sim-server (slow enough that its one-slot worker is busy while others idle)."""
    server = SimServer("sim-model", 8, SimProfile(ttft_s=0.05, tokens_per_s=200.0))
    async with running_app(server.app(), free_port()) as base:
        yield base


def openai_worker(redis_url: str, upstream: str, **kw: Any) -> Any:
    settings = worker_settings(redis_url, engine="openai", upstream_url=upstream, **kw)
    return running_worker(settings)


async def post(base: str, body: dict[str, Any]) -> dict[str, Any]:
    """The upstream's own answer (its first choice), asked directly."""
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        response = await client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        return dict(response.json()["choices"][0])


@pytest.fixture
async def stack(redis_url: str, upstream: str) -> AsyncIterator[tuple[str, Any, Any]]:
    """A gateway, one ``openai`` worker (capable) and one ``sim`` worker (incapable)."""
    async with (
        running_gateway(gateway_settings(redis_url, admission_refresh_s=0.2)) as base,
        openai_worker(redis_url, upstream, max_seqs=1) as capable,
        running_worker(worker_settings(redis_url)) as plain,
    ):
        yield base, capable, plain


async def test_no_live_worker_with_the_feature_is_400_naming_it(redis_url: str) -> None:
    async with (
        running_gateway(gateway_settings(redis_url)) as base,
        running_worker(worker_settings(redis_url)),
    ):
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        try:
            with pytest.raises(openai.BadRequestError) as err:
                await client.chat.completions.create(
                    model="sim-model", messages=MSG, extra_body={"top_k": 5}
                )
            assert err.value.param == "top_k"
            assert "no live worker of model 'sim-model' supports `top_k`" in str(err.value)
            with pytest.raises(openai.BadRequestError) as err:
                await client.chat.completions.create(model="sim-model", messages=MSG, n=2)
            assert err.value.param == "n"
            schema = {"name": "w", "schema": {"type": "object"}}
            with pytest.raises(openai.BadRequestError) as err:
                await client.chat.completions.create(
                    model="sim-model",
                    messages=MSG,
                    response_format={"type": "json_schema", "json_schema": schema},
                )
            assert err.value.param == "response_format"
            assert "json_schema" in str(err.value)
            with pytest.raises(openai.BadRequestError) as err:
                await client.chat.completions.create(
                    model="sim-model", messages=MSG, tools=[WEATHER]
                )
            assert err.value.param == "tools"
            # neutral values need nothing
            reply = await client.chat.completions.create(
                model="sim-model", messages=MSG, max_tokens=3, n=1, presence_penalty=0
            )
            assert reply.choices[0].message.content
        finally:
            await client.close()


async def test_tool_calls_relayed_through_the_openai_engine(
    stack: tuple[str, Any, Any], upstream: str
) -> None:
    base, _, _ = stack
    body = {"model": "sim-model", "messages": MSG, "tools": [WEATHER]}
    direct = (await post(upstream, body))["message"]["tool_calls"][0]
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    try:
        whole = await client.chat.completions.create(
            model="sim-model", messages=MSG, tools=[WEATHER], tool_choice="auto"
        )
        choice = whole.choices[0]
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]  # type: ignore[index]
        assert call.id == direct["id"] and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == json.loads(direct["function"]["arguments"])
        assert set(json.loads(call.function.arguments)) == {"city", "celsius"}

        stream = await client.chat.completions.create(
            model="sim-model", messages=MSG, tools=[WEATHER], stream=True
        )
        name, args, finish = "", "", None
        async for chunk in stream:
            if chunk.choices:
                for delta in chunk.choices[0].delta.tool_calls or []:
                    name += (delta.function and delta.function.name) or ""
                    args += (delta.function and delta.function.arguments) or ""
                finish = chunk.choices[0].finish_reason or finish
        assert (name, finish) == ("get_weather", "tool_calls")
        assert args == direct["function"]["arguments"]  # relayed unchanged, piece by piece
    finally:
        await client.close()


async def test_logprobs_relayed_unchanged(stack: tuple[str, Any, Any], upstream: str) -> None:
    base, _, _ = stack
    body = {"model": "sim-model", "messages": MSG, "max_tokens": 6, "logprobs": True}
    body["top_logprobs"] = 3
    direct = await post(upstream, body)
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    try:
        whole = await client.chat.completions.create(**body)
        got = whole.choices[0].logprobs
        assert got is not None and got.content is not None
        assert [e.model_dump() for e in got.content] == direct["logprobs"]["content"]
        stream = await client.chat.completions.create(**body, stream=True)
        entries = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].logprobs:
                entries += [e.model_dump() for e in chunk.choices[0].logprobs.content or []]
        assert entries == direct["logprobs"]["content"]
        assert all(len(e["top_logprobs"]) == 3 for e in entries)
    finally:
        await client.close()


async def test_only_a_capable_worker_takes_feature_jobs(
    stack: tuple[str, Any, Any], redis: Redis
) -> None:
    """The capable worker has one slot and a slow upstream, so the incapable one is idle
    and pulls while feature jobs wait: it must leave them (it serves the plain ones)."""
    base, capable, plain = stack
    keys = Keys()

    async def ask(extra: dict[str, Any]) -> str:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            body = {"model": "sim-model", "messages": MSG, "max_tokens": 4, **extra}
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            job_id = response.headers["x-slipstream-job-id"]
            return str(await redis.hget(keys.job("sim-model", job_id), "owner"))

    featured = [ask({"top_k": 4, "seed": i}) for i in range(6)]
    plains = [ask({"seed": i}) for i in range(6)]
    owners = await asyncio.gather(*featured, *plains)
    assert set(owners[:6]) == {capable.id}
    assert plain.id in owners[6:]


async def test_feature_job_cut_mid_tool_call_fails_clearly(
    redis: Redis, redis_url: str, upstream: str
) -> None:
    """A worker delivered part of a tool call and died; the one that takes over cannot
    continue a tool call from partial output, so the job fails with a clear error."""
    from shared.models import EventBatch, TokenEvent

    keys = Keys()
    store = JobStore(redis, keys, ttl_s=60)
    job = make_job(max_tokens=32)
    job = job.model_copy(update={"features": Features(tools=[WEATHER])})  # type: ignore[list-item]
    await store.enqueue(job)
    first = await store.pull(
        job.model, "ghost", free_tokens=10_000, idle=True, lease_ms=200,
        aging_ms={}, max_deliveries=5, caps=to_bits(Feature),
    )  # fmt: skip
    assert first.claimed is not None
    delta = {"index": 0, "id": "call_1", "function": {"name": "get_weather", "arguments": '{"ci'}}
    batch = EventBatch(events=[TokenEvent(s=1, x="", tc=[delta])])
    assert await store.emit(first.claimed, batch, new_tokens=1)
    async with openai_worker(redis_url, upstream, lease_s=1.0):
        for _ in range(200):
            if await store.job_state(job.model, job.id) == JobState.FAILED:
                break
            await asyncio.sleep(0.05)
    log = await store.read_log(job.model, job.id)
    error = log[-1].batch.events[-1]
    assert error.t == "error" and error.code == "continuation_unsupported"  # type: ignore[union-attr]
    assert "`tools`" in error.message  # type: ignore[union-attr]


async def test_pull_fails_a_job_no_live_worker_can_serve(redis: Redis) -> None:
    """The race behind the gateway's check: the capable worker left after admission. The
    incapable one does not take the job, and it ends at once with a clear error."""
    store = JobStore(redis, Keys(), ttl_s=60)
    job = make_job(priority=Priority.NORMAL)
    job = job.model_copy(update={"features": Features(top_k=3)})
    await store.enqueue(job)
    result = await store.pull(
        job.model, "plain", free_tokens=10_000, idle=True, lease_ms=1000,
        aging_ms={}, max_deliveries=5, caps=0,
    )  # fmt: skip
    assert result.kind == "empty"
    assert await store.job_state(job.model, job.id) == JobState.FAILED
    error = (await store.read_log(job.model, job.id))[-1].batch.events[-1]
    assert error.code == "unsupported_feature" and error.status == 400  # type: ignore[union-attr]


async def test_ignore_eos_goes_only_where_it_is_implemented(redis_url: str, upstream: str) -> None:
    """GuideLLM fixes output lengths with vLLM's ``ignore_eos``: a worker whose engine lacks
    it (here an upstream configured without it) gets no such job, and the 400 names it;
    ``false`` is neutral. The simulator implements it (it never ends a sequence early)."""
    body: dict[str, Any] = {"model": "sim-model", "messages": MSG, "max_tokens": 7}
    async with (
        running_gateway(gateway_settings(redis_url)) as base,
        openai_worker(redis_url, upstream, upstream_capabilities="top_k"),
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        refused = await client.post("/v1/chat/completions", json={**body, "ignore_eos": True})
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "ignore_eos"
        neutral = await client.post("/v1/chat/completions", json={**body, "ignore_eos": False})
        assert neutral.status_code == 200
    async with (
        running_gateway(gateway_settings(redis_url)) as base,
        running_worker(worker_settings(redis_url)),
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        served = await client.post("/v1/chat/completions", json={**body, "ignore_eos": True})
        assert served.status_code == 200, served.text
        assert served.json()["usage"]["completion_tokens"] == 7


@pytest.mark.parametrize(
    ("extra", "needs"),
    [
        ({}, None),
        ({"n": 1, "top_k": 0, "logprobs": False}, None),  # set, but to "off"
        ({"top_k": 5}, {Feature.TOP_K}),
        ({"presence_penalty": 0.5}, {Feature.PRESENCE_PENALTY}),
        ({"logprobs": True, "top_logprobs": 2}, {Feature.LOGPROBS}),
    ],
)
def test_a_request_asks_for_exactly_the_features_it_sets(
    extra: dict[str, Any], needs: set[Feature] | None
) -> None:
    """``features()`` answers "nothing" without building the model when the request sets
    none of its fields; every field of ``Features`` is a request field of the same name, or
    that shortcut would miss it."""
    from gateway.schemas import ChatCompletionRequest

    assert set(Features.model_fields) <= set(ChatCompletionRequest.model_fields)
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **extra})
    features = body.features()
    assert (features.needs() if features is not None else None) == needs
