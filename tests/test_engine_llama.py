"""The llama engine on the real Gemma 3 270M model, driven directly (no gateway, no Redis)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from shared.models import ChatMessage, Job, SamplingParams
from worker.engine import TRANSCRIPT_STOPS, EngineError, GenerationRequest
from worker.engines.llama import LlamaConfig, LlamaEngine, default_threads

pytestmark = [pytest.mark.llama, pytest.mark.asyncio(loop_scope="module")]

N_CTX = 1024
SEQS = 4
PROMPT = "The three most useful things to pack for a long hike are"


def job(
    prompt: str | None = PROMPT,
    *,
    messages: list[ChatMessage] | None = None,
    max_tokens: int = 24,
    temperature: float = 0.0,
    seed: int | None = None,
) -> Job:
    return Job(
        id="job-1",
        model="gemma3-270m",
        kind="chat" if messages else "completion",
        prompt=None if messages else prompt,
        messages=messages,
        params=SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed),
        enqueued_at_ms=0,
        prompt_tokens_estimate=8,
        request_id="req-1",
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine() -> AsyncIterator[LlamaEngine]:
    eng = LlamaEngine(LlamaConfig(max_seqs=SEQS, n_ctx=N_CTX))
    await eng.start()
    yield eng
    await eng.close()


async def pieces(eng: LlamaEngine, request: GenerationRequest) -> list[str]:
    return [text async for text in eng.generate(request)]


async def test_greedy_completion(engine: LlamaEngine) -> None:
    assert engine.healthy() and engine.has_room()
    assert engine.capacity() == (N_CTX, SEQS)  # KV cells of the one context, sequences
    assert await engine.count_prompt_tokens(job()) > 5
    out = await pieces(engine, GenerationRequest(job()))
    assert 0 < len(out) <= 24
    assert "".join(out).strip()


async def test_same_request_same_text(engine: LlamaEngine) -> None:
    first = await pieces(engine, GenerationRequest(job()))
    await pieces(engine, GenerationRequest(job("Something else entirely:")))  # dirty the cache
    assert await pieces(engine, GenerationRequest(job())) == first


async def test_seeded_sampling_is_reproducible(engine: LlamaEngine) -> None:
    sampled = job(temperature=0.9, seed=1234)
    assert await pieces(engine, GenerationRequest(sampled)) == await pieces(
        engine, GenerationRequest(sampled)
    )


async def test_two_workers_agree(engine: LlamaEngine) -> None:
    """Another worker (another engine, other sequences and thread count) generates the same."""
    expected = await pieces(engine, GenerationRequest(job()))
    other = LlamaEngine(LlamaConfig(max_seqs=2, n_ctx=N_CTX, threads=1))
    await other.start()
    try:
        assert other.capacity() == (N_CTX, 2)
        both = await asyncio.gather(
            pieces(other, GenerationRequest(job())), pieces(other, GenerationRequest(job()))
        )
    finally:
        await other.close()
    assert list(both) == [expected, expected]


async def idle(eng: LlamaEngine) -> bool:
    """Wait (at most 10 s: a decode step on a loaded machine can take seconds) for the
    scheduler to drop what was cancelled: no sequence holds cells."""
    assert eng.sched is not None
    for _ in range(500):
        if not eng.sched.running and not eng.sched.pending and eng.sched.reserved == 0:
            return eng.sched.slots_free() == SEQS
        await asyncio.sleep(0.02)
    return False


async def test_aclose_frees_the_slot_promptly(engine: LlamaEngine) -> None:
    stream = engine.generate(GenerationRequest(job(max_tokens=400)))
    for _ in range(3):
        await anext(stream)
    start = time.perf_counter()
    await stream.aclose()  # type: ignore[attr-defined]
    closed_s = time.perf_counter() - start
    assert closed_s < 0.5, f"aclose took {closed_s:.3f}s"
    assert await idle(engine)
    start = time.perf_counter()
    again = engine.generate(GenerationRequest(job(max_tokens=2)))
    await anext(again)  # the next request is served at once
    assert time.perf_counter() - start < 2.0
    await again.aclose()  # type: ignore[attr-defined]


async def test_task_cancel_frees_the_slot(engine: LlamaEngine) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(GenerationRequest(job(max_tokens=400))):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert await idle(engine)


async def test_event_loop_stays_responsive(engine: LlamaEngine) -> None:
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - before - 0.01)

    tick = asyncio.create_task(ticker())
    await pieces(engine, GenerationRequest(job(max_tokens=16)))
    tick.cancel()
    assert lags and max(lags) < 0.15, f"event loop stalled {max(lags):.3f}s"


@pytest.mark.parametrize("k", [1, 7, 16])
async def test_continuation_matches_uninterrupted(engine: LlamaEngine, k: int) -> None:
    await engine.clear_cache()  # exact equality needs in-order cells: docs/reliability.md
    full = await pieces(engine, GenerationRequest(job()))
    await engine.clear_cache()
    assert len(full) == 24
    resumed = GenerationRequest(job(), produced="".join(full[:k]), produced_tokens=k)
    rest = await pieces(engine, resumed)
    assert len(rest) == 24 - k
    assert "".join(full[:k] + rest) == "".join(full)


async def test_chat_continuation_matches_uninterrupted(engine: LlamaEngine) -> None:
    chat = job(messages=[ChatMessage(role="user", content="Name a colour.")], max_tokens=12)
    await engine.clear_cache()
    full = await pieces(engine, GenerationRequest(chat))
    assert full
    k = max(1, len(full) // 2)
    await engine.clear_cache()
    rest = await pieces(engine, GenerationRequest(chat, "".join(full[:k]), k))
    assert "".join(full[:k] + rest) == "".join(full)


async def test_chat_stops_at_the_next_turn(engine: LlamaEngine) -> None:
    chat = job(messages=[ChatMessage(role="user", content="Hi! How are you?")], max_tokens=64)
    assert await engine.count_prompt_tokens(chat) > 5
    out = await pieces(engine, GenerationRequest(chat))
    text = "".join(out)
    assert not any(stop in text for stop in TRANSCRIPT_STOPS)
    assert len(out) < 64  # base Gemma starts a "User:" turn well before 64 tokens


async def test_chat_template_when_the_gguf_has_one(engine: LlamaEngine) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    assert engine.formatter is None  # the packaged Gemma is a base model: no chat template
    template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}"
        "<end_of_turn>\n{% endfor %}<start_of_turn>model\n"
    )
    engine.formatter = Jinja2ChatFormatter(template, "<eos>", "<bos>")
    try:
        chat = job(messages=[ChatMessage(role="user", content="Hi")], max_tokens=8)
        rendered = engine.formatter(messages=[{"role": "user", "content": "Hi"}]).prompt
        assert rendered.startswith("<bos><start_of_turn>user\nHi<end_of_turn>")
        assert engine.model is not None
        expected = engine.model.tokenize(rendered.encode(), add_bos=False, special=True)
        assert expected[:2] == [engine.model.token_bos(), 105]  # special tokens, one BOS
        assert await engine.count_prompt_tokens(chat) == len(expected)
        assert len(await pieces(engine, GenerationRequest(chat))) <= 8
    finally:
        engine.formatter = None


async def test_multibyte_characters_never_split(engine: LlamaEngine) -> None:
    out = await pieces(engine, GenerationRequest(job("🦙🦙🦙🦙🦙🦙🦙🦙", max_tokens=16)))
    assert len(out) == 16  # one piece per token, even a piece holding a partial character
    assert all("\ufffd" not in piece for piece in out)
    assert "🦙" in "".join(out)
    assert "" in out  # byte tokens: the first bytes of an emoji yield nothing yet


async def test_prompt_longer_than_the_context(engine: LlamaEngine) -> None:
    with pytest.raises(EngineError) as caught:
        await pieces(engine, GenerationRequest(job("word " * (N_CTX + 10))))
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.status == 400
    assert await idle(engine)


async def test_produced_budget_spent_yields_nothing(engine: LlamaEngine) -> None:
    assert await pieces(engine, GenerationRequest(job(max_tokens=4), " a b c d", 4)) == []


async def test_default_threads_use_every_core() -> None:
    """One context on every core (several contexts sharing them was measured 18x slower)."""
    assert default_threads(cores=2) == 2
    assert default_threads(cores=16) == 16
    assert default_threads(3, cores=2) == 3


async def test_slots_is_a_deprecated_alias_of_max_seqs() -> None:
    from worker.settings import WorkerSettings

    assert LlamaConfig.from_settings(WorkerSettings(engine="llama")).max_seqs == 8
    assert LlamaConfig.from_settings(WorkerSettings(engine="llama", max_seqs=4)).max_seqs == 4
    assert LlamaConfig.from_settings(WorkerSettings(engine="llama", slots=3)).max_seqs == 3
