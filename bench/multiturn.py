"""Experiment 5, warm state: a seeded multi-turn chat trace over simulated engines that keep a
prefix cache and charge prefill for every prompt token they do not hold.

Conversations arrive as a Poisson process; each opens with one of a few long system prompts,
then runs 3-10 turns: a turn's messages are the previous turn's messages, the assistant's
answer as the client received it (leading whitespace stripped, as clients keep it) and a new
user message; the client thinks between turns. Every request carries ``X-Session-Id`` (the
conversation) and asks for ``stream_options.include_usage``, so the prefix-cache hit ratio is
read from ``usage.prompt_tokens_details.cached_tokens`` of each response, whichever balancer
served it. Every arm replays the same conversations, one arm after another.

The simulator's answers are deterministic (a function of the prompt), so the trace knows every
turn's prompt in advance: that gives the offered load exactly (the fleet's capacity with every
prompt token prefilled, i.e. no cache hit) and lets the harness check that each arm's client
really sent what the trace expects (``answers_mismatched``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.arms import available, make_arm
from bench.fleet import MODEL, Backend, capacity_rps, warm_fleet
from bench.process import own_cpu_seconds
from bench.result import ERROR, OK, TIMEOUT, Result, outcome_for_error, outcome_for_status
from bench.sse import SSEParser, http_json, read_body, read_head, request_bytes, split_url
from bench.stats import percentile
from bench.trace import WORDS
from shared.models import ChatMessage, Job, SamplingParams
from shared.prefix import block_hashes
from shared.prompt import render_transcript
from worker.engines.sim import TOKENS_PER_BLOCK, context_hash, count_tokens, next_token
from worker.warm import WarmPrefixes

SLIPSTREAM_ARMS = {"slipstream-blind": False, "slipstream-warm": True}  # arm -> affinity on


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


def sim_answer(prompt: str, max_tokens: int, seed: int = 0) -> str:
    """The simulator's answer to ``prompt`` (worker.engines.sim, greedy and deterministic)."""
    context = context_hash(seed, prompt)
    out = []
    for _ in range(max_tokens):
        token = next_token(context)
        context.update(token.encode())
        out.append(token)
    return "".join(out)


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
        answers.append(sim_answer(prompt_of(conv.messages(k, answers)), max_tokens[k]))
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


# --- the client ----------------------------------------------------------------------------
@dataclass(slots=True)
class TurnResult(Result):
    conv: int = 0
    turn: int = 0
    prompt_tokens: int = 0  # from the response's usage
    cached_tokens: int = 0
    answer: str = ""
    answer_ok: bool = True  # the answer is the one the trace expects
    affinity: dict[str, Any] | None = None


def _body(messages: list[dict[str, str]], max_tokens: int) -> bytes:
    payload = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
    }
    return json.dumps(payload).encode()


def _parse_stream(raw: bytes) -> tuple[str, dict[str, Any] | None]:
    """The answer text and the usage object of a chat completion's SSE body."""
    text: list[str] = []
    usage = None
    for line in raw.replace(b"\r\n", b"\n").split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if not data.startswith(b"{"):
            continue
        try:
            chunk = json.loads(data)
        except ValueError:
            continue
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                text.append(content)
    return "".join(text), usage


async def one_turn(base_url: str, result: TurnResult, body: bytes, session: str) -> None:
    host, port, _ = split_url(base_url)
    reader, writer = await asyncio.open_connection(host, port)
    start = time.perf_counter()
    first: float | None = None
    raw: list[bytes] = []
    parser = SSEParser()

    def sink(data: bytes) -> bool:
        nonlocal first
        raw.append(data)
        if parser.feed(data) and first is None:
            first = time.perf_counter()
        return parser.done

    try:
        headers = {"X-Session-Id": session, "X-Priority": "normal"}
        writer.write(request_bytes("POST", host, port, "/v1/chat/completions", body, headers))
        head = await read_head(reader)
        result.status = head.status
        result.job_id = head.headers.get("x-slipstream-job-id")
        result.backend = head.headers.get("x-backend")
        if head.status != 200:
            result.outcome = outcome_for_status(head.status)
            result.error = f"HTTP {head.status}"
            return
        await read_body(reader, head, sink)
        end = time.perf_counter()
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()
    result.tokens = parser.tokens
    if first is not None:
        result.ttft_ms = (first - start) * 1000
    if parser.error is not None:
        result.outcome = outcome_for_error(parser.error)
        result.error = str(parser.error.get("code") or parser.error.get("message"))
        return
    if not (parser.done or parser.finish_reason):
        result.outcome, result.error = ERROR, "stream ended early"
        return
    result.e2e_ms = (end - start) * 1000
    result.outcome = OK
    result.answer, usage = _parse_stream(b"".join(raw))
    if usage:
        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        result.cached_tokens = int(details.get("cached_tokens") or 0)


async def run_conversation(
    base_url: str, conv: Conversation, t0: float, timeout_s: float, out: list[TurnResult]
) -> None:
    """Replay one conversation: wait for its arrival, then each turn after the think time.
    A turn that fails ends the conversation (its next turns would need the answer)."""
    await asyncio.sleep(max(0.0, t0 + conv.at_s - time.perf_counter()))
    answers: list[str] = []
    for k in range(len(conv.users)):
        if k:
            await asyncio.sleep(conv.thinks[k])
        messages = conv.messages(k, answers)
        r = TurnResult(
            idx=conv.cid * 100 + k,
            at_s=round(time.perf_counter() - t0, 3),
            priority="normal",
            max_tokens=conv.max_tokens[k],
            deadline_ms=0,
            conv=conv.cid,
            turn=k,
        )
        r.start_s = r.at_s
        out.append(r)
        try:
            async with asyncio.timeout(timeout_s):
                await one_turn(base_url, r, _body(messages, conv.max_tokens[k]), conv.session)
        except TimeoutError:
            r.outcome, r.error = TIMEOUT, f"client timeout after {timeout_s:.0f} s"
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            r.outcome, r.error = ERROR, f"{type(exc).__name__}: {exc}"[:200]
        if not r.served:
            return
        r.answer_ok = r.answer == conv.answers[k]
        answers.append(r.answer)


async def replay(base_url: str, convs: list[Conversation], timeout_s: float) -> list[TurnResult]:
    out: list[TurnResult] = []
    t0 = time.perf_counter() + 0.05
    await asyncio.gather(*(run_conversation(base_url, c, t0, timeout_s, out) for c in convs))
    return sorted(out, key=lambda r: (r.conv, r.turn))


# --- the oracle ----------------------------------------------------------------------------
@dataclass(slots=True)
class _Engine:
    backend: Backend
    cache: WarmPrefixes
    busy: int = 0
    rank: int = 0


@dataclass(order=True, slots=True)
class _Event:
    at: float
    seq: int
    kind: str = field(compare=False)  # "arrive" or "finish"
    conv: Conversation = field(compare=False)
    turn: int = field(compare=False)
    engine: int = field(compare=False, default=-1)


def simulate_oracle(convs: list[Conversation], fleet: list[Backend]) -> list[TurnResult]:
    """A zero-overhead router that knows every engine's cache exactly (the simulator's own
    model): a turn goes to the engine with a free slot holding the longest prefix of its
    prompt (least loaded, then fastest, on ties); when no slot is free it waits in one central
    FIFO queue for the first slot to free. Think times run from each turn's end, as the client's."""
    order = sorted(fleet, key=lambda b: b.service_s(1.0))
    engines = [
        _Engine(b, WarmPrefixes(max(1, b.cache_tokens // TOKENS_PER_BLOCK)), rank=i)
        for i, b in enumerate(order)
    ]
    events: list[_Event] = []
    seq = 0

    def push(at: float, kind: str, conv: Conversation, turn: int, engine: int = -1) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, _Event(at, seq, kind, conv, turn, engine))

    for c in convs:
        push(c.at_s, "arrive", c, 0)
    queue: list[tuple[float, Conversation, int]] = []
    results: dict[tuple[int, int], TurnResult] = {}

    def start(now: float, arrived: float, conv: Conversation, turn: int, e: int) -> None:
        eng = engines[e]
        prompt = prompt_of(conv.messages(turn, conv.answers))
        prompt_tokens = count_tokens(prompt)
        cached = min(prompt_tokens, eng.cache.match(block_hashes(prompt)) * TOKENS_PER_BLOCK)
        b = eng.backend
        ttft = now - arrived + b.ttft_ms / 1000 + b.prefill_s(prompt_tokens - cached)
        service = b.service_s(conv.max_tokens[turn], prompt_tokens - cached)
        eng.busy += 1
        results[(conv.cid, turn)] = TurnResult(
            idx=conv.cid * 100 + turn,
            at_s=round(arrived, 3),
            priority="normal",
            max_tokens=conv.max_tokens[turn],
            deadline_ms=0,
            start_s=arrived,
            status=200,
            outcome=OK,
            ttft_ms=ttft * 1000,
            e2e_ms=(now - arrived + service) * 1000,
            tokens=conv.max_tokens[turn],
            backend=b.name,
            conv=conv.cid,
            turn=turn,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached,
            answer=conv.answers[turn],
        )
        push(now + service, "finish", conv, turn, e)

    def pick(conv: Conversation, turn: int) -> int | None:
        free = [i for i, e in enumerate(engines) if e.busy < e.backend.slots]
        if not free:
            return None
        chain = block_hashes(prompt_of(conv.messages(turn, conv.answers)))
        return max(
            free,
            key=lambda i: (
                engines[i].cache.match(chain, touch=False),
                -engines[i].busy / engines[i].backend.slots,
                -engines[i].rank,
            ),
        )

    while events:
        ev = heapq.heappop(events)
        if ev.kind == "arrive":
            e = pick(ev.conv, ev.turn)
            if e is None:
                queue.append((ev.at, ev.conv, ev.turn))
            else:
                start(ev.at, ev.at, ev.conv, ev.turn, e)
            continue
        eng = engines[ev.engine]
        eng.busy -= 1
        prompt = prompt_of(ev.conv.messages(ev.turn, ev.conv.answers))
        eng.cache.add(block_hashes(prompt + ev.conv.answers[ev.turn]))
        if queue:
            arrived, conv, turn = queue.pop(0)
            start(ev.at, arrived, conv, turn, ev.engine)
        if ev.turn + 1 < len(ev.conv.users):
            push(ev.at + ev.conv.thinks[ev.turn + 1], "arrive", ev.conv, ev.turn + 1)
    return [results[k] for k in sorted(results)]


# --- summaries -----------------------------------------------------------------------------
def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def summarize_turns(
    results: list[TurnResult], planned: int, duration_s: float, ttft_goal_ms: float
) -> dict[str, Any]:
    served = [r for r in results if r.served]
    first = [r.ttft_ms for r in served if r.turn == 0 and r.ttft_ms is not None]
    later = [r.ttft_ms for r in served if r.turn > 0 and r.ttft_ms is not None]
    every = first + later
    prompt = sum(r.prompt_tokens for r in served)
    cached = sum(r.cached_tokens for r in served)
    later_prompt = sum(r.prompt_tokens for r in served if r.turn > 0)
    later_cached = sum(r.cached_tokens for r in served if r.turn > 0)
    good = sum(1 for r in served if r.ttft_ms is not None and r.ttft_ms <= ttft_goal_ms)
    per_worker: dict[str, dict[str, int]] = {}
    for r in served:
        w = per_worker.setdefault(
            r.backend or "?", {"requests": 0, "prompt_tokens": 0, "uncached_tokens": 0, "tokens": 0}
        )
        w["requests"] += 1
        w["prompt_tokens"] += r.prompt_tokens
        w["uncached_tokens"] += r.prompt_tokens - r.cached_tokens
        w["tokens"] += r.tokens
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    return {
        "planned_turns": planned,
        "sent": len(results),
        "served": len(served),
        "outcomes": outcomes,
        "ttft_first_p50_ms": _r(percentile(first, 50)),
        "ttft_first_p99_ms": _r(percentile(first, 99)),
        "ttft_later_p50_ms": _r(percentile(later, 50)),
        "ttft_later_p99_ms": _r(percentile(later, 99)),
        "ttft_p50_ms": _r(percentile(every, 50)),
        "ttft_p99_ms": _r(percentile(every, 99)),
        "e2e_p50_ms": _r(percentile([r.e2e_ms for r in served if r.e2e_ms is not None], 50)),
        "hit_ratio_pct": _r(100 * cached / prompt if prompt else None, 2),
        "later_hit_ratio_pct": _r(100 * later_cached / later_prompt if later_prompt else None, 2),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "goodput_pct": _r(100 * good / planned if planned else None, 2),
        "goodput_turns_per_s": _r(good / duration_s if duration_s else None, 3),
        "per_worker": dict(sorted(per_worker.items())),
        "answers_mismatched": sum(1 for r in served if not r.answer_ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def affinity_summary(results: list[TurnResult], wait_ms: float) -> dict[str, Any]:
    rows = [r.affinity for r in results if r.affinity]
    if not rows:
        return {"jobs": 0, "reported": False}
    waits = [float(a.get("wait_ms") or 0) for a in rows]
    outcomes: dict[str, int] = {}
    for a in rows:
        key = str(a.get("outcome"))
        outcomes[key] = outcomes.get(key, 0) + 1
    honoured = sum(1 for a in rows if a.get("target") and a.get("worker") == a.get("target"))
    targeted = sum(1 for a in rows if a.get("target"))
    return {
        "jobs": len(rows),
        "reported": True,
        "outcomes": outcomes,
        "targeted": targeted,
        "ran_on_target": honoured,
        "wait_p50_ms": _r(percentile(waits, 50)),
        "wait_p99_ms": _r(percentile(waits, 99)),
        "wait_max_ms": _r(max(waits)),
        "configured_wait_ms": wait_ms,
        "over_wait": sum(1 for w in waits if w > wait_ms),
    }


# --- the experiment ------------------------------------------------------------------------
def _sample(results: list[TurnResult], later: bool) -> list[float]:
    return sorted(
        round(r.ttft_ms, 1)
        for r in results
        if r.served and r.ttft_ms is not None and (r.turn > 0) == later
    )


async def _job_affinity(base_url: str, results: list[TurnResult]) -> None:
    sem = asyncio.Semaphore(16)

    async def one(r: TurnResult) -> None:
        async with sem:
            status, body = await http_json(f"{base_url}/v1/jobs/{r.job_id}", timeout=10.0)
        if status == 200 and isinstance(body, dict) and isinstance(body.get("affinity"), dict):
            r.affinity = body["affinity"]

    await asyncio.gather(*(one(r) for r in results if r.job_id))


async def _run_arm(
    name: str, plan: Any, fleet: list[Backend], work: Workload, workdir: Path
) -> dict[str, Any]:
    options: dict[str, Any] = {"queue_timeout_s": plan.queue_timeout_s}
    base = name
    if name in SLIPSTREAM_ARMS:
        base = "slipstream"
        env = {"SLIPSTREAM_AFFINITY": "true" if SLIPSTREAM_ARMS[name] else "false"}
        env["SLIPSTREAM_AFFINITY_WAIT_MS"] = str(plan.warm_affinity_wait_ms)
        options["gateway_env"] = env
    async with make_arm(base, fleet, workdir / "warm" / name, **options) as arm:
        arm.group.mark_cpu()
        client_cpu, started = own_cpu_seconds(), time.perf_counter()
        results = await replay(arm.target().base_url, work.conversations, plan.client_timeout_s)
        wall = time.perf_counter() - started
        cpu = arm.group.cpu_since_mark() | {"client": round(own_cpu_seconds() - client_cpu, 3)}
        await arm.attribute(results)  # type: ignore[arg-type]
        if name in SLIPSTREAM_ARMS:
            await _job_affinity(arm.target().base_url, results)
    return _summary(results, plan, work) | {
        "cpu_s": cpu,
        "wall_s": round(wall, 1),
        "affinity": affinity_summary(results, plan.warm_affinity_wait_ms),
    }


def _summary(results: list[TurnResult], plan: Any, work: Workload) -> dict[str, Any]:
    planned = sum(len(c.users) for c in work.conversations)
    return summarize_turns(results, planned, work.spec.duration_s, plan.warm_ttft_goal_ms) | {
        "ttft_samples": {"first": _sample(results, False), "later": _sample(results, True)},
        "slowest_later": _slowest(results),
    }


def _slowest(results: list[TurnResult], n: int = 12) -> list[dict[str, Any]]:
    """The later turns with the longest TTFT: where each ran and what it found cached."""
    later = [r for r in results if r.served and r.turn > 0 and r.ttft_ms is not None]
    later.sort(key=lambda r: -(r.ttft_ms or 0))
    return [
        {
            "conv": r.conv,
            "turn": r.turn,
            "at_s": r.at_s,
            "ttft_ms": round(r.ttft_ms or 0, 1),
            "backend": r.backend,
            "prompt_tokens": r.prompt_tokens,
            "cached_tokens": r.cached_tokens,
            "affinity": r.affinity,
        }
        for r in later[:n]
    ]


def arms_of(plan: Any) -> list[str]:
    out = []
    for name in plan.warm_arms:
        base = "slipstream" if name in SLIPSTREAM_ARMS else name
        if available(base):
            out.append(name)
    return out


async def run_warm(plan: Any, workdir: Path) -> dict[str, Any]:
    fleet = warm_fleet(plan.warm_cache_tokens)
    work = make_workload(
        fleet,
        plan.warm_load,
        plan.warm_duration_s,
        plan.seed,
        system_tokens=plan.warm_system_tokens,
        answer_tokens=plan.warm_answer_tokens,
        think_mean_s=plan.warm_think_mean_s,
    )
    out: dict[str, Any] = {
        "fleet": [
            {
                "name": b.name,
                "slots": b.slots,
                "tokens_per_s": b.tokens_per_s,
                "ttft_ms": b.ttft_ms,
                "prefill_tokens_per_s": b.prefill_tokens_per_s,
                "cache_tokens": b.cache_tokens,
            }
            for b in fleet
        ],
        "load": plan.warm_load,
        "trace": work.describe(),
        "ttft_goal_ms": plan.warm_ttft_goal_ms,
        "affinity_wait_ms": plan.warm_affinity_wait_ms,
        "arms": {"oracle-warm": _summary(simulate_oracle(work.conversations, fleet), plan, work)},
    }
    for name in arms_of(plan):
        print(f"[bench] warm: {name} ...", flush=True)
        try:
            out["arms"][name] = await _run_arm(name, plan, fleet, work, workdir)
        except Exception as exc:  # one arm's failure is recorded; the others still run
            out["arms"][name] = {"failed": f"{type(exc).__name__}: {exc}"[:2000]}
        await asyncio.sleep(0.5)
    return out
