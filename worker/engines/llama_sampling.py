"""Per-sequence token choice from one row of logits: greedy, or seeded temperature/top-p.

Sampling draws exactly one uniform number per token from the sequence's own generator, so a
continuation after ``k`` delivered tokens skips ``k`` draws and goes on as the uninterrupted
run would have (given the same logits, which the engine guarantees; see llama_ctx).
"""

from __future__ import annotations

import secrets

import numpy as np

from worker.engines.llama_ctx import Logits


class Sampler:
    def __init__(self, temperature: float, top_p: float, seed: int | None, skip: int = 0) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.rng = np.random.default_rng(secrets.randbits(64) if seed is None else seed)
        if temperature > 0 and skip > 0:
            self.rng.random(skip)

    def __call__(self, logits: Logits) -> int:
        if self.temperature <= 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.temperature
        order = np.argsort(-scaled, kind="stable")
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p)) + 1
            probs = probs[:keep] / probs[:keep].sum()
        u = self.rng.random()
        index = min(int(np.searchsorted(np.cumsum(probs), u, side="right")), len(probs) - 1)
        return int(order[index])
