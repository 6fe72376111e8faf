"""The simulated engine's prefix cache: what a hit saves, eviction within the size, a bounded
advertisement, and the sim-server reporting ``cached_tokens``. No Redis: engine-level."""

from __future__ import annotations

import json
import time

import httpx

from shared.models import ChatMessage, Job, SamplingParams
from shared.prefix import BLOCK_BYTES
from worker.engine import GenerationRequest
from worker.engines.sim import TOKENS_PER_BLOCK, SimEngine, SimProfile
from worker.sim_server import SimServer

SYSTEM = "You are a careful assistant. " * 40  # ~1,160 characters: four whole blocks


def chat(messages: list[tuple[str, str]], max_tokens: int = 8) -> Job:
    return Job(
        id="j",
        model="sim-model",
        kind="chat",
        messages=[ChatMessage(role=r, content=c) for r, c in messages],
        params=SamplingParams(max_tokens=max_tokens, temperature=0),
        enqueued_at_ms=0,
        prompt_tokens_estimate=1,
        request_id="r",
    )


async def run(engine: SimEngine, job: Job) -> tuple[str, GenerationRequest, float]:
    request = GenerationRequest(job)
    started = time.perf_counter()
    first = None
    parts = []
    async for token in engine.generate(request):
        first = first or time.perf_counter()
        parts.append(token)
    assert first is not None
    return "".join(parts), request, first - started


async def test_next_turn_finds_its_prefix_and_pays_less_prefill() -> None:
    engine = SimEngine(SimProfile(ttft_s=0.0, tokens_per_s=10_000, prefill_tokens_per_s=2_000))
    turn1 = [("system", SYSTEM), ("user", "What is a queue? " * 20)]
    answer, first, cold_ttft = await run(engine, chat(turn1))
    assert first.stats.cached_tokens == 0 and first.stats.prompt_tokens > 300
    assert cold_ttft >= first.stats.prompt_tokens / 2_000 * 0.9

    turn2 = [*turn1, ("assistant", answer.lstrip()), ("user", "And a stream?")]
    _, second, warm_ttft = await run(engine, chat(turn2))
    # everything of turn 1 (prompt + answer) in whole blocks is reused
    assert second.stats.cached_tokens >= first.stats.prompt_tokens - TOKENS_PER_BLOCK
    assert second.stats.cached_tokens < second.stats.prompt_tokens
    uncached = second.stats.prompt_tokens - second.stats.cached_tokens
    assert warm_ttft < cold_ttft / 2
    assert warm_ttft >= uncached / 2_000 * 0.9

    # another conversation on the same system prompt reuses the system prompt's blocks only
    _, other, _ = await run(engine, chat([("system", SYSTEM), ("user", "Different question")]))
    assert 0 < other.stats.cached_tokens <= len(SYSTEM) // 4


async def test_no_prefill_charge_by_default_but_reuse_still_reported() -> None:
    engine = SimEngine(SimProfile(ttft_s=0.0, tokens_per_s=10_000))
    job = chat([("system", SYSTEM), ("user", "hi")])
    await run(engine, job)
    _, again, ttft = await run(engine, job)
    assert again.stats.cached_tokens > 0 and ttft < 0.05


async def test_cache_evicts_least_recently_used_within_its_size() -> None:
    cache_tokens = 8 * TOKENS_PER_BLOCK  # 8 blocks
    engine = SimEngine(SimProfile(ttft_s=0.0, tokens_per_s=10_000, cache_tokens=cache_tokens))
    warm = engine.warm()
    assert warm is not None and warm.max_blocks == 8
    prompts = [f"conversation {i}: " + "x" * (3 * BLOCK_BYTES) for i in range(5)]
    for p in prompts:
        await run(engine, chat([("user", p)], max_tokens=1))
        assert len(warm.blocks()) <= 8
    # the newest two fit (3 blocks each), the oldest were evicted
    _, newest, _ = await run(engine, chat([("user", prompts[-1])], max_tokens=1))
    _, oldest, _ = await run(engine, chat([("user", prompts[0])], max_tokens=1))
    assert newest.stats.cached_tokens == 3 * TOKENS_PER_BLOCK
    assert oldest.stats.cached_tokens == 0


async def test_advertisement_is_bounded_by_the_cache_size() -> None:
    engine = SimEngine(
        SimProfile(ttft_s=0.0, tokens_per_s=100_000, cache_tokens=32 * TOKENS_PER_BLOCK)
    )
    warm = engine.warm()
    assert warm is not None
    for i in range(60):
        await run(engine, chat([("user", f"{i} " + "y" * (5 * BLOCK_BYTES))], max_tokens=1))
    assert 0 < len(warm.blocks()) <= 32


def test_no_cache_when_its_size_is_zero() -> None:
    assert SimEngine(SimProfile(cache_tokens=0)).warm() is None


async def test_sim_server_reports_cached_tokens_in_streamed_usage() -> None:
    server = SimServer("sim-model", 2, SimProfile(ttft_s=0.0, tokens_per_s=10_000))
    transport = httpx.ASGITransport(app=server.app())
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]
    body = {
        "model": "sim-model",
        "messages": messages,
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
        usages = []
        for _ in range(2):
            r = await client.post("/v1/chat/completions", json=body)
            chunks = [
                json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")
            ]
            usages.append(chunks[-1]["usage"])
            assert chunks[-1]["choices"] == []
        plain = await client.post("/v1/chat/completions", json={**body, "stream": False})
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    assert usages[0]["prompt_tokens"] > 250
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] >= 4 * TOKENS_PER_BLOCK
    assert plain.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
