"""The batching llama engine on the real Gemma 3 270M: batches, the prefix cache, capacity."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from shared.models import ChatMessage
from shared.prefix import block_hashes
from tests.test_engine_llama import job, pieces
from worker.engine import GenerationRequest
from worker.engines.llama import LlamaConfig, LlamaEngine
from worker.engines.llama_sched import MAX_ROWS

pytestmark = [pytest.mark.llama, pytest.mark.asyncio(loop_scope="module")]

PROMPTS = [
    "The three most useful things to pack for a long hike are",
    "A short history of the bicycle:",
    "def fibonacci(n):",
    "Once upon a time, in a village by the sea,",
]
LONG = "Notes on the weather of the northern coast, season by season. " * 12  # > MAX_ROWS


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine() -> AsyncIterator[LlamaEngine]:
    eng = LlamaEngine(LlamaConfig(max_seqs=6, n_ctx=2048))
    await eng.start()
    yield eng
    await eng.close()


async def alone(eng: LlamaEngine, prompt: str, n: int = 20) -> str:
    await eng.clear_cache()
    return "".join(await pieces(eng, GenerationRequest(job(prompt, max_tokens=n))))


async def test_batch_gives_each_the_text_it_gives_alone(engine: LlamaEngine) -> None:
    prompts = [*PROMPTS, LONG]
    expected = [await alone(engine, p) for p in prompts]
    await engine.clear_cache()
    assert engine.sched is not None
    steps = engine.sched.steps
    batched = await asyncio.gather(
        *(pieces(engine, GenerationRequest(job(p, max_tokens=20))) for p in prompts)
    )
    assert ["".join(b) for b in batched] == expected
    assert engine.sched.steps - steps < 20 * len(prompts) // 2  # they really shared steps


async def test_long_prompt_prefilled_between_decode_steps(engine: LlamaEngine) -> None:
    """A long prompt arriving mid-decode is read in chunks; the running one keeps going."""
    expected = await alone(engine, PROMPTS[0], 40)
    long_alone = await alone(engine, LONG)
    await engine.clear_cache()
    gaps: list[float] = []

    async def running() -> str:
        out, last = [], time.perf_counter()
        async for text in engine.generate(GenerationRequest(job(PROMPTS[0], max_tokens=40))):
            now = time.perf_counter()
            gaps.append(now - last)
            out.append(text)
            last = now
            if len(out) == 5:
                late.set()
        return "".join(out)

    late = asyncio.Event()

    async def arriving() -> str:
        await late.wait()
        return "".join(await pieces(engine, GenerationRequest(job(LONG, max_tokens=20))))

    first, second = await asyncio.gather(running(), arriving())
    assert (first, second) == (expected, long_alone)
    assert engine.model is not None
    assert len(engine.model.tokenize(LONG.encode(), add_bos=True, special=False)) > MAX_ROWS


async def test_warm_prefix_equals_cold(engine: LlamaEngine) -> None:
    system = "You are a terse assistant. Answer in one short sentence. " * 6
    chat = [ChatMessage(role="system", content=system), ChatMessage(role="user", content="Hi")]
    cold_req = GenerationRequest(job(messages=chat, max_tokens=16))
    await engine.clear_cache()
    cold = "".join(await pieces(engine, cold_req))
    assert cold_req.stats.cached_tokens == 0 and cold_req.stats.prompt_tokens > 50
    warm_req = GenerationRequest(job(messages=chat, max_tokens=16))
    warm = "".join(await pieces(engine, warm_req))
    assert warm == cold
    assert warm_req.stats.cached_tokens == warm_req.stats.prompt_tokens - 1
    # another question on the same system prompt: its common prefix is reused
    other = [chat[0], ChatMessage(role="user", content="What is rain?")]
    other_req = GenerationRequest(job(messages=other, max_tokens=16))
    other_warm = "".join(await pieces(engine, other_req))
    assert other_req.stats.cached_tokens > 50
    await engine.clear_cache()
    assert "".join(await pieces(engine, GenerationRequest(job(messages=other, max_tokens=16)))) == (
        other_warm
    )


async def test_next_chat_turn_is_advertised_warm(engine: LlamaEngine) -> None:
    """What the engine caches is advertised as fingerprints of prompt + answer."""
    from shared.prompt import render_transcript

    await engine.clear_cache()
    await asyncio.sleep(0.05)  # the discards reach the loop
    content = "Tell me about the sea and the weather on the northern coast in winter. " * 5
    turn = [ChatMessage(role="user", content=content)]
    request = GenerationRequest(job(messages=turn, max_tokens=16))
    answer = "".join(await pieces(engine, request))
    await asyncio.sleep(0.05)
    warm = engine.warm()
    assert warm is not None and warm.blocks()
    follow = [
        *turn,
        ChatMessage(role="assistant", content=answer.strip()),
        ChatMessage(role="user", content="And in summer?"),
    ]
    chain = block_hashes(render_transcript(job(messages=follow)))
    assert warm.match(chain) >= len(block_hashes(render_transcript(job(messages=turn))))
    next_req = GenerationRequest(job(messages=follow, max_tokens=4))
    await pieces(engine, next_req)
    assert next_req.stats.cached_tokens > request.stats.prompt_tokens


async def test_cancel_mid_batch_frees_cells_and_others_go_on(engine: LlamaEngine) -> None:
    expected = [await alone(engine, p, 30) for p in PROMPTS[:2]]
    await engine.clear_cache()
    assert engine.sched is not None
    compactions = engine.sched.compactions
    victim = engine.generate(GenerationRequest(job(PROMPTS[2], max_tokens=400)))
    others = [
        asyncio.create_task(pieces(engine, GenerationRequest(job(p, max_tokens=30))))
        for p in PROMPTS[:2]
    ]
    for _ in range(3):
        await anext(victim)
    held = engine.sched.reserved
    await victim.aclose()  # type: ignore[attr-defined]
    for _ in range(50):
        if engine.sched.reserved < held - 300:
            break
        await asyncio.sleep(0.01)
    assert engine.sched.reserved < held - 300  # its reservation (prompt + 400) is free at once
    assert not all(t.done() for t in others)
    assert ["".join(t) for t in await asyncio.gather(*others)] == expected
    assert engine.sched.compactions == compactions  # its cells went to the prefix cache


async def test_prompt_larger_than_free_cells_waits() -> None:
    """Cells, not only slots, bound admission: a job that does not fit waits, then runs."""
    eng = LlamaEngine(LlamaConfig(max_seqs=4, n_ctx=512, cache_share=0.0))
    await eng.start()
    try:
        assert eng.capacity() == (512, 4)
        big_prompt = LONG  # about 160 tokens: more than the cells the hog leaves
        expected = "".join(await pieces(eng, GenerationRequest(job(big_prompt, max_tokens=8))))
        hog_job = job(LONG * 2, max_tokens=40)  # about 320 + 40 cells of 512
        hog = asyncio.create_task(pieces(eng, GenerationRequest(hog_job)))
        await asyncio.sleep(0.5)
        assert eng.sched is not None and eng.sched.reserved > 340
        assert eng.has_room()  # a slot and some cells are free...
        started = time.perf_counter()
        big = await pieces(eng, GenerationRequest(job(big_prompt, max_tokens=8)))  # not enough
        assert hog.done()  # it ran only once the hog finished and freed its cells
        assert "".join(big) == expected
        assert time.perf_counter() - started > 0.5
    finally:
        await eng.close()


async def test_slots_full_means_no_room() -> None:
    eng = LlamaEngine(LlamaConfig(max_seqs=1, n_ctx=512))
    await eng.start()
    try:
        stream = eng.generate(GenerationRequest(job(max_tokens=100)))
        await anext(stream)
        assert not eng.has_room()
        await stream.aclose()  # type: ignore[attr-defined]
        for _ in range(50):
            if eng.has_room():
                break
            await asyncio.sleep(0.01)
        assert eng.has_room()
    finally:
        await eng.close()


MOUNTAINS = "Field notes on the mountain passes, their snow and their shepherds. "
RIVERS = "A survey of river mouths, tides and the birds that feed on the flats. "


async def traced(eng: LlamaEngine, prompt: str, n: int) -> tuple[str, str]:
    """Text and the digest of every logits row the sequence produced (bit for bit)."""
    trace = eng.sched.trace if eng.sched is not None else None
    assert trace is not None
    before = len(trace)
    text = "".join(await pieces(eng, GenerationRequest(job(prompt, max_tokens=n))))
    for _ in range(100):  # the digest is recorded when the scheduler releases the sequence
        mine = [digest for seen, digest in trace[before:] if seen.endswith(prompt)]
        if mine:
            return text, mine[0]
        await asyncio.sleep(0.01)
    raise AssertionError("no digest recorded")


async def test_eviction_while_running_keeps_logits_bitwise() -> None:
    """Cached prefixes evicted below a running sequence leave free cells its next tokens would
    land in, out of position order; the scheduler lays the cache out again first, so the
    sequence's logits stay bitwise those of its run alone."""
    eng = LlamaEngine(LlamaConfig(max_seqs=4, n_ctx=1024, cache_share=1.0))
    await eng.start()
    try:
        assert eng.sched is not None
        eng.sched.trace = []
        await eng.clear_cache()
        reference = await traced(eng, PROMPTS[0], 48)
        await eng.clear_cache()
        await traced(eng, MOUNTAINS * 20, 4)  # cached prefixes in the lowest cells
        await traced(eng, RIVERS * 20, 4)
        compactions = eng.sched.compactions
        running = asyncio.create_task(traced(eng, PROMPTS[0], 48))
        while eng.sched.steps < 3 or not eng.sched.running:
            await asyncio.sleep(0.005)
        big = "Letters from a lighthouse keeper about storms and ships. " * 45  # ~600 tokens
        await pieces(eng, GenerationRequest(job(big, max_tokens=4)))  # needs evictions
        assert eng.sched.compactions > compactions  # cells were freed while it ran
        assert not running.done() or eng.sched.steps > 0
        assert await running == reference
    finally:
        await eng.close()


async def test_warm_prefix_above_evicted_cells_equals_cold() -> None:
    """Idle trimming frees an old prefix's low cells; a request reusing a newer prefix above
    them must still equal its cold run (the real-model warm trace's 2 unexplained turns)."""
    system = "You are a patient tutor. Explain slowly and give one example. " * 8
    eng = LlamaEngine(LlamaConfig(max_seqs=2, n_ctx=2048, cache_share=0.08))
    await eng.start()
    try:
        assert eng.sched is not None
        eng.sched.trace = []
        await eng.clear_cache()
        cold = await traced(eng, system + "Question: what is a prime number?", 24)
        await eng.clear_cache()
        await traced(eng, MOUNTAINS * 9, 2)  # oldest: trimmed when idle
        await traced(eng, system + "Question: what is an atom?", 2)  # kept, above it
        for _ in range(100):
            if eng.sched.dirty or eng.sched.compactions:
                break
            await asyncio.sleep(0.01)
        warm = await traced(eng, system + "Question: what is a prime number?", 24)
        assert eng.sched.compactions >= 1
        assert warm == cold
    finally:
        await eng.close()
