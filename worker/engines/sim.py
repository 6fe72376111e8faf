"""A simulated language model, for tests and benchmarks. It is not a model.

It behaves like one where dispatch can tell: a time to first token, a decode speed that drops
as more sequences run at once, and deterministic text — the next token is a function of the
context so far (prompt + text produced) and the seed — so continuing from a partial output
reproduces the uninterrupted one exactly, as a real model's greedy decoding does.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from shared.models import Job
from worker.warm import WarmPrefixes
from worker.engine import EngineError, GenerationRequest, render_transcript
from worker.settings import SimSettings

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

    @classmethod
    def from_settings(cls, s: SimSettings) -> SimProfile:
        return cls(
            s.sim_ttft_ms / 1000,
            s.sim_tokens_per_s,
            s.sim_slowdown,
            s.sim_fail_prompt,
            s.sim_crash_prompt,
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


def count_tokens(text: str) -> int:
    """The simulator's tokenizer: about four characters a token."""
    return max(1, (len(text) + 3) // 4)


class SimEngine:
    """Simulated engine (``--engine sim``)."""

    name = "sim"

    def __init__(self, profile: SimProfile) -> None:
        self.profile = profile
        self.active = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def warm(self) -> WarmPrefixes | None:
        return None

    def healthy(self) -> bool:
        return True

    def has_room(self) -> bool:
        return True

    def capacity(self) -> tuple[int, int] | None:
        return None

    async def count_prompt_tokens(self, job: Job) -> int:
        return count_tokens(render_transcript(job))

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
        self.active += 1
        try:
            await asyncio.sleep(self.profile.ttft_s)
            for _ in range(remaining):
                token = next_token(context)
                context.update(token.encode())
                yield token
                await asyncio.sleep(self.token_delay())
        finally:
            self.active -= 1
