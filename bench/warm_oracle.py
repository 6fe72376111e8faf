"""The warm-state experiment's oracle: a zero-overhead router that knows every engine's cache.

A discrete-event simulation over the simulator's own model (``worker/engines/sim.py``: a
prefix cache of whole prompt + answer chains, prefill charged per uncached token): a turn
goes to the engine with a free slot holding the longest prefix of its prompt (least loaded,
then fastest, on ties); when no slot is free it waits in one central FIFO queue for the first
slot to free. Think times run from each turn's end, as the client's do.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from bench.fleet import Backend
from bench.result import OK
from bench.warm_client import TurnResult
from bench.warm_trace import Conversation, prompt_of
from shared.prefix import block_hashes
from worker.engines.sim import TOKENS_PER_BLOCK, count_tokens
from worker.warm import WarmPrefixes


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


class CacheOracle:
    """One simulation over a fleet; ``run`` replays conversations and returns every turn."""

    def __init__(self, fleet: list[Backend]) -> None:
        order = sorted(fleet, key=lambda b: b.service_s(1.0))
        self.engines = [
            _Engine(b, WarmPrefixes(max(1, b.cache_tokens // TOKENS_PER_BLOCK)), rank=i)
            for i, b in enumerate(order)
        ]
        self.events: list[_Event] = []
        self.seq = 0
        self.queue: list[tuple[float, Conversation, int]] = []
        self.results: dict[tuple[int, int], TurnResult] = {}

    def push(self, at: float, kind: str, conv: Conversation, turn: int, engine: int = -1) -> None:
        self.seq += 1
        heapq.heappush(self.events, _Event(at, self.seq, kind, conv, turn, engine))

    def start(self, now: float, arrived: float, conv: Conversation, turn: int, e: int) -> None:
        eng = self.engines[e]
        prompt = prompt_of(conv.messages(turn, conv.answers))
        prompt_tokens = count_tokens(prompt)
        cached = min(prompt_tokens, eng.cache.match(block_hashes(prompt)) * TOKENS_PER_BLOCK)
        b = eng.backend
        ttft = now - arrived + b.ttft_ms / 1000 + b.prefill_s(prompt_tokens - cached)
        service = b.service_s(conv.max_tokens[turn], prompt_tokens - cached)
        eng.busy += 1
        self.results[(conv.cid, turn)] = TurnResult(
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
        self.push(now + service, "finish", conv, turn, e)

    def pick(self, conv: Conversation, turn: int) -> int | None:
        engines = self.engines
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

    def finish(self, ev: _Event) -> None:
        eng = self.engines[ev.engine]
        eng.busy -= 1
        prompt = prompt_of(ev.conv.messages(ev.turn, ev.conv.answers))
        eng.cache.add(block_hashes(prompt + ev.conv.answers[ev.turn]))
        if self.queue:
            arrived, conv, turn = self.queue.pop(0)
            self.start(ev.at, arrived, conv, turn, ev.engine)
        if ev.turn + 1 < len(ev.conv.users):
            self.push(ev.at + ev.conv.thinks[ev.turn + 1], "arrive", ev.conv, ev.turn + 1)

    def run(self, convs: list[Conversation]) -> list[TurnResult]:
        for c in convs:
            self.push(c.at_s, "arrive", c, 0)
        while self.events:
            ev = heapq.heappop(self.events)
            if ev.kind == "finish":
                self.finish(ev)
            elif (e := self.pick(ev.conv, ev.turn)) is None:
                self.queue.append((ev.at, ev.conv, ev.turn))
            else:
                self.start(ev.at, ev.at, ev.conv, ev.turn, e)
        return [self.results[k] for k in sorted(self.results)]


def simulate_oracle(convs: list[Conversation], fleet: list[Backend]) -> list[TurnResult]:
    """Every turn of ``convs`` as the cache-aware oracle would serve it on ``fleet``."""
    return CacheOracle(fleet).run(convs)
