"""The ideal-queue oracle: a discrete-event simulation of one zero-overhead central FIFO queue
that hands each request to whichever backend slot frees first (the fastest backend when
several are free), fed the same trace as the arms. It is the physical limit of balancing for
that trace: no routing decision can finish earlier without reordering or preempting."""

from __future__ import annotations

from dataclasses import dataclass

from bench.fleet import Backend
from bench.result import LATE, OK, Result
from bench.trace import TraceRequest


@dataclass(slots=True)
class _Slot:
    free_at: float
    rank: int  # 0 = fastest backend
    backend: Backend


def _slots(fleet: list[Backend]) -> list[_Slot]:
    order = sorted(fleet, key=lambda b: b.service_s(1.0))
    return [_Slot(0.0, rank, b) for rank, b in enumerate(order) for _ in range(b.slots)]


def _pick(slots: list[_Slot], at: float) -> _Slot:
    free = [s for s in slots if s.free_at <= at]
    if free:
        return min(free, key=lambda s: s.rank)
    return min(slots, key=lambda s: (s.free_at, s.rank))


def simulate(trace: list[TraceRequest], fleet: list[Backend]) -> list[Result]:
    """Results as a client of the ideal queue would have measured them."""
    slots = _slots(fleet)
    results: list[Result] = []
    for req in sorted(trace, key=lambda r: r.at_s):
        slot = _pick(slots, req.at_s)
        b = slot.backend
        start = max(req.at_s, slot.free_at)
        wait = start - req.at_s
        e2e = wait + b.service_s(req.max_tokens)
        slot.free_at = start + b.service_s(req.max_tokens)
        gap_ms = 1000.0 / b.tokens_per_s
        results.append(
            Result(
                idx=req.idx,
                at_s=req.at_s,
                priority=req.priority,
                max_tokens=req.max_tokens,
                deadline_ms=req.deadline_ms,
                start_s=req.at_s,
                status=200,
                outcome=OK if e2e * 1000 <= req.deadline_ms else LATE,
                ttft_ms=(wait + b.ttft_ms / 1000) * 1000,
                e2e_ms=e2e * 1000,
                tokens=req.max_tokens,
                backend=b.name,
                itl_ms=[gap_ms] * max(0, req.max_tokens - 1),
            )
        )
    return sorted(results, key=lambda r: r.idx)
