"""Experiment ``warm``'s trace: seeded multi-turn conversations over long system prompts.

The simulator's answers are deterministic (a function of the prompt), so the trace knows every
turn's prompt in advance: that gives the offered load exactly and lets the harness check that
each arm's client really sent what the trace expects.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from bench.fleet import MODEL, Backend, capacity_rps
from bench.trace import WORDS
from shared.models import ChatMessage, Job, SamplingParams
from shared.prompt import render_transcript
from worker.engines.sim import count_tokens, greedy_text


# --- the trace -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MultiTurnSpec:
    rate_per_s: float  # conversation arrivals
    duration_s: float  # arrivals happen in [0, duration_s)
    systems: int = 8
    system_tokens: int = 1000
    min_turns: int = 3
    max_turns: int = 10
    user_tokens: tuple[int, int] = (20, 120)  # a new user message, uniform
    answer_tokens: tuple[int, int] = (20, 170)  # max_tokens of a turn, uniform
    think_mean_s: float = 2.0  # exponential pause between a turn's end and the next one


@dataclass(frozen=True, slots=True)
class Conversation:
    cid: int
    at_s: float
    system: str
    users: tuple[str, ...]
    max_tokens: tuple[int, ...]
    thinks: tuple[float, ...]  # pause before each turn after the first
    answers: tuple[str, ...]  # what the simulator answers each turn (the trace's expectation)

    @property
    def session(self) -> str:
        return f"conv-{self.cid}"

    def messages(self, turn: int, answers: list[str] | tuple[str, ...]) -> list[dict[str, str]]:
        out = [{"role": "system", "content": self.system}]
        for k in range(turn):
            out.append({"role": "user", "content": self.users[k]})
            out.append({"role": "assistant", "content": answers[k].lstrip()})
        out.append({"role": "user", "content": self.users[turn]})
        return out


def _words(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    n = 0
    while n < chars:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


def prompt_of(messages: list[dict[str, str]]) -> str:
    """The prompt the simulator sees (the gateway and the sim-server render it the same)."""
    job = Job(
        id="x",
        model=MODEL,
        kind="chat",
        messages=[ChatMessage(role=m["role"], content=m["content"]) for m in messages],  # type: ignore[arg-type]
        params=SamplingParams(max_tokens=1),
        enqueued_at_ms=0,
        prompt_tokens_estimate=1,
        request_id="x",
    )
    return render_transcript(job)


def system_prompts(spec: MultiTurnSpec, seed: int) -> list[str]:
    rng = random.Random(seed * 7 + 1)
    return [
        f"System prompt {i}. " + _words(rng, 4 * spec.system_tokens) for i in range(spec.systems)
    ]


def conversation(spec: MultiTurnSpec, seed: int, cid: int, systems: list[str]) -> Conversation:
    """Conversation ``cid``'s content (its own seeded draw: independent of the arrival rate)."""
    rng = random.Random(seed * 1_000_003 + cid)
    turns = rng.randint(spec.min_turns, spec.max_turns)
    system = systems[rng.randrange(len(systems))]
    users = tuple(
        f"[conversation {cid}, turn {k + 1}] " + _words(rng, 4 * rng.randint(*spec.user_tokens))
        for k in range(turns)
    )
    max_tokens = tuple(rng.randint(*spec.answer_tokens) for _ in range(turns))
    thinks = tuple(rng.expovariate(1 / spec.think_mean_s) for _ in range(turns))
    conv = Conversation(cid, 0.0, system, users, max_tokens, thinks, ())
    answers: list[str] = []
    for k in range(turns):
        answers.append(greedy_text(prompt_of(conv.messages(k, answers)), max_tokens[k]))
    return Conversation(cid, 0.0, system, users, max_tokens, thinks, tuple(answers))


def turn_shapes(convs: list[Conversation]) -> list[tuple[int, int]]:
    """(prompt tokens, max_tokens) of every turn of ``convs``."""
    return [
        (count_tokens(prompt_of(c.messages(k, c.answers))), c.max_tokens[k])
        for c in convs
        for k in range(len(c.users))
    ]


@dataclass(frozen=True, slots=True)
class Workload:
    spec: MultiTurnSpec
    conversations: list[Conversation]
    mean_turns: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    capacity_turns_per_s: float  # every prompt token prefilled (no cache)

    def describe(self) -> dict[str, Any]:
        turns = sum(len(c.users) for c in self.conversations)
        return {
            "conversations": len(self.conversations),
            "turns": turns,
            "conversation_rate_per_s": round(self.spec.rate_per_s, 3),
            "arrivals_s": self.spec.duration_s,
            "systems": self.spec.systems,
            "system_tokens": self.spec.system_tokens,
            "turns_range": [self.spec.min_turns, self.spec.max_turns],
            "user_tokens": list(self.spec.user_tokens),
            "answer_tokens": list(self.spec.answer_tokens),
            "think_mean_s": self.spec.think_mean_s,
            "mean_turns": round(self.mean_turns, 2),
            "mean_prompt_tokens": round(self.mean_prompt_tokens, 1),
            "mean_output_tokens": round(self.mean_output_tokens, 1),
            "capacity_turns_per_s": round(self.capacity_turns_per_s, 3),
        }


def make_workload(
    fleet: list[Backend], load: float, duration_s: float, seed: int, **shape: Any
) -> Workload:
    """Conversations whose turns offer ``load`` x the fleet's cache-less capacity."""
    spec = MultiTurnSpec(rate_per_s=1.0, duration_s=duration_s, **shape)
    systems = system_prompts(spec, seed)
    sample = [conversation(spec, seed + 1, i, systems) for i in range(60)]  # the mix's means
    shapes = turn_shapes(sample)
    mean_turns = len(shapes) / len(sample)
    mean_prompt = sum(p for p, _ in shapes) / len(shapes)
    mean_out = sum(t for _, t in shapes) / len(shapes)
    capacity = capacity_rps(fleet, mean_out, mean_prompt)
    rate = load * capacity / mean_turns
    spec = MultiTurnSpec(**{**_fields(spec), "rate_per_s": rate})
    rng = random.Random(seed)
    convs: list[Conversation] = []
    at = rng.expovariate(rate)
    while at < duration_s:
        c = conversation(spec, seed, len(convs), systems)
        convs.append(
            Conversation(c.cid, round(at, 6), c.system, c.users, c.max_tokens, c.thinks, c.answers)
        )
        at += rng.expovariate(rate)
    return Workload(spec, convs, mean_turns, mean_prompt, mean_out, capacity)


def _fields(spec: MultiTurnSpec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in spec.__dataclass_fields__}
