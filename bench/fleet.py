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
    prefill_tokens_per_s: float = 0.0  # 0: prompt tokens cost nothing (only ttft_ms)
    cache_tokens: int = 32768  # the simulator's prefix cache

    def service_s(self, tokens: float, prompt_tokens: float = 0.0) -> float:
        """Time one request of ``tokens`` output tokens holds a slot (``prompt_tokens`` of its
        prompt not cached: prefilled at ``prefill_tokens_per_s``)."""
        return self.ttft_ms / 1000 + self.prefill_s(prompt_tokens) + tokens / self.tokens_per_s

    def prefill_s(self, prompt_tokens: float) -> float:
        rate = self.prefill_tokens_per_s
        return prompt_tokens / rate if rate > 0 else 0.0

    def sim_flags(self) -> list[str]:
        """The simulator's command-line flags for this backend (sim-server and worker alike)."""
        return [
            *("--sim-ttft-ms", str(self.ttft_ms), "--sim-tokens-per-s", str(self.tokens_per_s)),
            *("--sim-slowdown", "0"),
            *("--sim-prefill-tokens-per-s", str(self.prefill_tokens_per_s)),
            *("--sim-cache-tokens", str(self.cache_tokens)),
        ]


def capacity_rps(
    fleet: list[Backend], mean_tokens: float, mean_prompt_tokens: float = 0.0
) -> float:
    """Requests/s the fleet completes when every slot is busy (the load factor's 1.0); with
    ``mean_prompt_tokens``, every prompt token is prefilled (no cache hit)."""
    return sum(b.slots / b.service_s(mean_tokens, mean_prompt_tokens) for b in fleet)


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


def warm_fleet(cache_tokens: int = 32768) -> list[Backend]:
    """The warm-state experiment's fleet: three backends at 10 ms/token that prefill 2,000
    uncached prompt tokens/s, and one at half those speeds; a prefix cache each."""
    fast = [Backend(f"fast-{i}", 8, 100.0, 20.0, 2000.0, cache_tokens) for i in (1, 2, 3)]
    return [*fast, Backend("slow-1", 8, 50.0, 40.0, 1000.0, cache_tokens)]
