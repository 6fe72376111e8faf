"""Per-sequence token choice from one row of logits: greedy, or seeded temperature/top-p, and
the request features the llama engine implements (``Features``, via ``SamplingSpec``).

Sampling draws exactly one uniform number per token from the sequence's own generator, so a
continuation after ``k`` delivered tokens skips ``k`` draws and goes on as the uninterrupted
run would have (given the same logits, which the engine guarantees; see llama_ctx). Every
feature below is a deterministic function of the logits, the token history and that one
draw, so the rule still holds with them.

Order, as vLLM applies them: ``logit_bias``; penalties (``repetition_penalty`` over prompt
and output, HF/vLLM style: positive logits divided, negative multiplied; ``presence`` and
``frequency`` over the output, OpenAI style: subtracted); the grammar of ``response_format``
(``llama_grammar``); then greedy (argmax) at temperature 0, else temperature, ``top_k``,
``min_p`` and ``top_p`` truncation and the draw. ``logprobs`` are the model's own
distribution (log-softmax of the raw logits, as vLLM reports by default), of the chosen
token and the ``top_logprobs`` most likely ones. A plain job (no spec) runs the original code.
"""

from __future__ import annotations

import secrets
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.engines.llama_ctx import Logits
from worker.engines.llama_grammar import Grammar

Row = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """A job's features, resolved for the llama engine (built on the event loop's side)."""

    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    bias: tuple[tuple[int, float], ...] = ()  # (token id, added logit)
    logprobs: int = -1  # alternatives to report per token (-1: no logprobs)
    gbnf: str | None = None  # response_format's grammar
    vocab: Any = None  # the llama.cpp vocabulary (the grammar sampler needs it)
    piece: Callable[[int], bytes] | None = None  # token -> bytes (logprobs' ``token``)
    is_eog: Callable[[int], bool] | None = None
    ignore_eos: bool = False  # an end-of-generation token does not end the sequence


class Sampler:
    def __init__(
        self,
        temperature: float,
        top_p: float,
        seed: int | None,
        skip: int = 0,
        spec: SamplingSpec | None = None,
        prompt: Sequence[int] = (),
        produced: Sequence[int] = (),
    ) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.rng = np.random.default_rng(secrets.randbits(64) if seed is None else seed)
        if temperature > 0 and skip > 0:
            self.rng.random(skip)
        self.spec = spec
        # logprobs of each token chosen (not end-of-generation ones), for the engine to take
        self.records: deque[dict[str, Any]] = deque()
        self.counts: Counter[int] = Counter(produced)  # output tokens so far
        self.seen: set[int] = set(prompt) | set(produced)
        self.grammar: Grammar | None = None
        if spec is not None and spec.gbnf is not None:
            self.grammar = Grammar(spec.vocab, spec.gbnf)
            for token in produced:  # a continuation: the delivered text's grammar state
                self.grammar.accept(token)

    def __call__(self, logits: Logits) -> int:
        if self.spec is None:
            return self._plain(logits)
        return self._featured(logits, self.spec)

    def _plain(self, logits: Logits) -> int:
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

    def _featured(self, logits: Logits, spec: SamplingSpec) -> int:
        row = self._adjust(logits.astype(np.float64), spec)
        u = self.rng.random() if self.temperature > 0 else 0.0  # one draw per token
        token = self._choose(row, u, spec)
        if self.grammar is not None and not self.grammar.allows(token):
            row = self.grammar.mask(row)  # only when the grammar refuses the usual choice
            token = self._choose(row, u, spec)
        if self.grammar is not None:
            self.grammar.accept(token)
        self.counts[token] += 1
        self.seen.add(token)
        if spec.logprobs >= 0 and not (spec.is_eog and spec.is_eog(token)):
            self.records.append(self._logprobs(logits, token, spec))
        return token

    def _adjust(self, row: Row, spec: SamplingSpec) -> Row:
        for token, bias in spec.bias:
            row[token] += bias
        if spec.repetition_penalty != 1.0 and self.seen:
            ids = np.fromiter(self.seen, dtype=np.int64)
            vals = row[ids]
            rp = spec.repetition_penalty
            row[ids] = np.where(vals > 0, vals / rp, vals * rp)
        if (spec.presence_penalty or spec.frequency_penalty) and self.counts:
            ids = np.fromiter(self.counts.keys(), dtype=np.int64)
            n = np.fromiter(self.counts.values(), dtype=np.float64)
            row[ids] -= spec.frequency_penalty * n + spec.presence_penalty
        return row

    def _choose(self, row: Row, u: float, spec: SamplingSpec) -> int:
        if self.temperature <= 0:
            return int(np.argmax(row))
        scaled = row / self.temperature
        order = np.argsort(-scaled, kind="stable")
        if spec.top_k > 0:
            order = order[: spec.top_k]
        probs = np.exp(scaled[order] - scaled[order[0]])
        finite = int(np.count_nonzero(probs))  # a grammar mask leaves zeros at the end
        probs = probs[: max(1, finite)]
        if spec.min_p > 0:
            probs = probs[: max(1, int(np.count_nonzero(probs >= spec.min_p)))]  # p/pmax >= min_p
        probs /= probs.sum()
        if self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p)) + 1
            probs = probs[:keep] / probs[:keep].sum()
        index = min(int(np.searchsorted(np.cumsum(probs), u, side="right")), len(probs) - 1)
        return int(order[index])

    def _logprobs(self, logits: Logits, token: int, spec: SamplingSpec) -> dict[str, Any]:
        raw = logits.astype(np.float64)
        top = raw.max()
        logz = top + np.log(np.exp(raw - top).sum())
        entry = _entry(token, float(raw[token] - logz), spec)
        alternatives = []
        if spec.logprobs > 0:
            best = np.argpartition(-raw, spec.logprobs)[: spec.logprobs]
            best = best[np.argsort(-raw[best], kind="stable")]
            alternatives = [_entry(int(t), float(raw[t] - logz), spec) for t in best]
        return {**entry, "top_logprobs": alternatives}


def _entry(token: int, logprob: float, spec: SamplingSpec) -> dict[str, Any]:
    raw = spec.piece(token) if spec.piece is not None else b""
    return {
        "token": raw.decode("utf-8", errors="replace"),
        "logprob": round(logprob, 6),
        "bytes": list(raw),
    }
