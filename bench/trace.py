"""Seeded request traces: Poisson arrivals, log-normal prompt and output lengths, priorities
and deadlines. The same seed gives every arm (and the oracle) the identical trace."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

WORDS = [
    "queue",
    "stream",
    "token",
    "worker",
    "gateway",
    "model",
    "capacity",
    "deadline",
    "priority",
    "latency",
    "backend",
    "balance",
    "request",
    "answer",
    "question",
    "small",
    "fast",
    "slow",
    "redis",
    "pull",
    "push",
    "event",
    "client",
    "server",
]


@dataclass(frozen=True, slots=True)
class TraceSpec:
    """What a trace looks like; ``rate_per_s`` arrivals for ``duration_s`` seconds."""

    rate_per_s: float
    duration_s: float
    mean_tokens: float = 128.0
    tokens_sigma: float = 0.6  # log-normal shape of the output length
    min_tokens: int = 4
    max_tokens: int = 512
    mean_prompt_words: float = 48.0
    priorities: tuple[tuple[str, float], ...] = (("high", 0.2), ("normal", 0.6), ("low", 0.2))
    deadline_base_ms: float = 2000.0
    deadline_per_token_ms: float = 30.0
    fixed_tokens: int = 0  # > 0: every request asks for exactly this many tokens


@dataclass(frozen=True, slots=True)
class TraceRequest:
    idx: int
    at_s: float  # arrival, seconds after the run starts
    prompt: str
    max_tokens: int
    priority: str
    deadline_ms: int  # time budget of the whole request


def lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    """A log-normal draw with the given mean (not median)."""
    mu = math.log(mean) - sigma * sigma / 2
    return rng.lognormvariate(mu, sigma)


def _priority(rng: random.Random, mix: tuple[tuple[str, float], ...]) -> str:
    names = [name for name, _ in mix]
    weights = [weight for _, weight in mix]
    return rng.choices(names, weights)[0]


def make_trace(spec: TraceSpec, seed: int) -> list[TraceRequest]:
    """Arrivals of a Poisson process of ``spec.rate_per_s`` over ``spec.duration_s``."""
    rng = random.Random(seed)
    out: list[TraceRequest] = []
    at = rng.expovariate(spec.rate_per_s)
    while at < spec.duration_s:
        if spec.fixed_tokens > 0:
            tokens = spec.fixed_tokens
        else:
            drawn = round(lognormal(rng, spec.mean_tokens, spec.tokens_sigma))
            tokens = min(spec.max_tokens, max(spec.min_tokens, drawn))
        words = max(1, round(lognormal(rng, spec.mean_prompt_words, 0.5)))
        prompt = f"request {len(out)}: " + " ".join(rng.choice(WORDS) for _ in range(words))
        deadline = spec.deadline_base_ms + spec.deadline_per_token_ms * tokens
        out.append(
            TraceRequest(
                idx=len(out),
                at_s=round(at, 6),
                prompt=prompt,
                max_tokens=tokens,
                priority=_priority(rng, spec.priorities),
                deadline_ms=int(deadline),
            )
        )
        at += rng.expovariate(spec.rate_per_s)
    return out


def mean_tokens(trace: list[TraceRequest]) -> float:
    return sum(r.max_tokens for r in trace) / len(trace) if trace else 0.0
