"""The simulated backends every arm runs: speed, time to first token and concurrency slots."""

from __future__ import annotations

from dataclasses import dataclass

MODEL = "sim-model"


@dataclass(frozen=True, slots=True)
class Backend:
    """One simulated engine: ``slots`` sequences at once at ``tokens_per_s`` each; beyond its
    slots it queues requests internally (``slipstream sim-server``), or its Slipstream worker
    pulls no more (``--max-seqs``)."""

    name: str
    slots: int = 8
    tokens_per_s: float = 100.0
    ttft_ms: float = 20.0

    def service_s(self, tokens: float) -> float:
        """Time one request of ``tokens`` output tokens holds a slot."""
        return self.ttft_ms / 1000 + tokens / self.tokens_per_s


def capacity_rps(fleet: list[Backend], mean_tokens: float) -> float:
    """Requests/s the fleet completes when every slot is busy (the load factor's 1.0)."""
    return sum(b.slots / b.service_s(mean_tokens) for b in fleet)


def capacity_tps(fleet: list[Backend]) -> float:
    """Tokens/s the fleet decodes when every slot is busy."""
    return sum(b.slots * b.tokens_per_s for b in fleet)


def balance_fleet(slow_factor: float = 2.0, ms_per_token: float = 10.0) -> list[Backend]:
    """Experiment 2's fleet: two backends at ``ms_per_token`` and one ``slow_factor`` slower."""
    fast = 1000.0 / ms_per_token
    return [
        Backend("fast-1", 8, fast, 20.0),
        Backend("fast-2", 8, fast, 20.0),
        Backend("slow-1", 8, fast / slow_factor, 20.0 * slow_factor),
    ]
