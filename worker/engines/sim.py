"""A simulated language model, for tests and benchmarks. It is not a model.

It behaves like one where dispatch can tell: a time to first token, a decode speed that drops
as more sequences run at once, and deterministic text — the next token is a function of the
context so far (prompt + text produced) and the seed — so continuing from a partial output
reproduces the uninterrupted one exactly, as a real model's greedy decoding does.

It also models a prefix cache, as vLLM's or llama.cpp's: a ``WarmPrefixes`` LRU of the block
chains (``shared.prefix``) of what it has generated (prompt + answer, so the next turn of a
conversation, which extends it, finds its prefix warm), bounded to ``cache_tokens``. With a
prefill rate set, the time to first token grows by the prompt tokens *not* found in the
cache divided by that rate: a cache hit saves exactly what it would save a real engine.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from shared.capabilities import Feature
from shared.models import Job
from shared.prefix import BLOCK_BYTES, block_hashes
from worker.engine import EngineError, GenerationRequest, render_transcript
from worker.settings import SimSettings
from worker.warm import WarmPrefixes

TOKENS_PER_BLOCK = BLOCK_BYTES // 4
"""The simulator's tokens in one fingerprint block (four characters a token)."""

VOCABULARY = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "while",
    "small",
    "models",
    "stream",
    "tokens",
    "through",
    "redis",
    "to",
    "eager",
    "clients",
    "who",
    "wait",
    "for",
    "answers",
    "about",
    "queues",
    "workers",
    "capacity",
    "and",
    "deadlines",
    "under",
    "load",
    "every",
    "request",
    "finds",
    "its",
    "way",
    "home",
    "again",
    "soon",
    "enough",
]


@dataclass(frozen=True, slots=True)
class SimProfile:
    ttft_s: float = 0.02
    tokens_per_s: float = 100.0
    slowdown: float = 0.0
    fail_prompt: str = ""
    crash_prompt: str = ""
    prefill_tokens_per_s: float = 0.0  # 0: prefill is free (only ``ttft_s`` is charged)
    cache_tokens: int = 32768  # size of the simulated prefix cache

    @classmethod
    def from_settings(cls, s: SimSettings) -> SimProfile:
        return cls(
            s.sim_ttft_ms / 1000,
            s.sim_tokens_per_s,
            s.sim_slowdown,
            s.sim_fail_prompt,
            s.sim_crash_prompt,
            s.sim_prefill_tokens_per_s,
            s.sim_cache_tokens,
        )


def next_token(context: hashlib.blake2b) -> str:
    """The token that follows a context, given the running hash of that context."""
    digest = context.copy().digest()
    return " " + VOCABULARY[int.from_bytes(digest[:4], "little") % len(VOCABULARY)]


def context_hash(seed: int, text: str) -> hashlib.blake2b:
    h = hashlib.blake2b(digest_size=16, person=b"slipstream-sim")
    h.update(seed.to_bytes(8, "little", signed=True))
    h.update(text.encode())
    return h


def greedy_text(prompt: str, max_tokens: int, seed: int = 0) -> str:
    """What the simulator generates for ``prompt``, uninterrupted (tests and benchmarks
    compare against it)."""
    context = context_hash(seed, prompt)
    out = []
    for _ in range(max_tokens):
        token = next_token(context)
        context.update(token.encode())
        out.append(token)
    return "".join(out)


def count_tokens(text: str) -> int:
    """The simulator's tokenizer: about four characters a token."""
    return max(1, (len(text) + 3) // 4)


class SimEngine:
    """Simulated engine (``--engine sim``).

    It implements one request feature, ``ignore_eos``: it never ends a sequence early, so it
    always generates ``max_tokens`` as that asks. Its next token is a hash of the context,
    not a draw from a distribution, so there is nothing for ``top_k`` or penalties to act on
    and no honest logprob to report. Those requests go to workers whose engines have them
    (``llama``, ``openai``), or are refused with a 400.
    """

    name = "sim"
    capabilities = frozenset({Feature.IGNORE_EOS})
    continuable = frozenset({Feature.IGNORE_EOS})

    def __init__(self, profile: SimProfile) -> None:
        self.profile = profile
        self.active = 0
        blocks = profile.cache_tokens // TOKENS_PER_BLOCK
        self.cache = WarmPrefixes(blocks) if blocks > 0 else None  # None: no cache modelled

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def warm(self) -> WarmPrefixes | None:
        return self.cache

    def healthy(self) -> bool:
        return True

    def has_room(self) -> bool:
        return True

    def capacity(self) -> tuple[int, int] | None:
        return None

    async def count_prompt_tokens(self, job: Job) -> int:
        return count_tokens(render_transcript(job))

    def prefill(self, prompt: str, request: GenerationRequest) -> float:
        """Look ``prompt`` up in the cache; record the reuse in ``request.stats`` and return the
        seconds its uncached tokens take to prefill."""
        prompt_tokens = count_tokens(prompt)
        matched = self.cache.match(block_hashes(prompt)) if self.cache is not None else 0
        cached = min(prompt_tokens, matched * TOKENS_PER_BLOCK)
        request.stats.prompt_tokens = prompt_tokens
        request.stats.cached_tokens = cached
        rate = self.profile.prefill_tokens_per_s
        return (prompt_tokens - cached) / rate if rate > 0 else 0.0

    def token_delay(self) -> float:
        extra = max(0, self.active - 1) * self.profile.slowdown
        return (1.0 + extra) / self.profile.tokens_per_s

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        prompt = render_transcript(request.job)
        if self.profile.fail_prompt and self.profile.fail_prompt in prompt:
            raise EngineError("simulated engine failure", code="engine_error")
        if self.profile.crash_prompt and self.profile.crash_prompt in prompt:
            os._exit(70)  # a simulated segfault: no cleanup, no goodbye
        seed = request.job.params.seed or 0
        context = context_hash(seed, prompt + request.produced)
        remaining = request.job.params.max_tokens - request.produced_tokens
        produced = [request.produced]
        self.active += 1
        try:
            await asyncio.sleep(self.profile.ttft_s + self.prefill(prompt, request))
            for _ in range(remaining):
                token = next_token(context)
                context.update(token.encode())
                produced.append(token)
                yield token
                await asyncio.sleep(self.token_delay())
        finally:
            self.active -= 1
            if self.cache is not None:
                # what the sequence leaves in the cache: its prompt and everything it produced
                # (the next turn's prompt extends it)
                self.cache.add(block_hashes(prompt + "".join(produced)))
