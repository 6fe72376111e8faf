"""What a job's runner does for feature requests: logprobs and tool-call deltas collected from
the engine's ``TokenOut``s, and the failover rule for features that cannot be continued.

Plain jobs never reach this module's collecting code: engines yield ``str`` for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.capabilities import Capabilities, Feature
from shared.models import Job
from worker.engine import EngineError, TokenOut


def continuation_error(job: Job, delivered: int, continuable: Capabilities) -> EngineError | None:
    """The error a job fails with when a worker takes it over after ``delivered`` tokens and
    it needs features this engine cannot continue exactly (a tool call cut mid-JSON, an
    upstream's logprobs or grammar state); None when it can go on. Restarting is not an
    option once tokens were delivered: the client has them and SSE ids cannot be taken back."""
    if delivered == 0:
        return None
    lost = job.needs() - continuable
    if not lost:
        return None
    names = ", ".join(f"`{f.value}`" for f in Feature if f in lost)
    return EngineError(
        f"the worker generating this response failed after {delivered} tokens, and {names} "
        "cannot be continued exactly from a partial output; the request failed rather than "
        "return a corrupted result (retry it)",
        code="continuation_unsupported",
        status=502,
    )


@dataclass(slots=True)
class Extras:
    """Logprobs and tool-call deltas waiting for the next token event, and the whole lists
    for the final (non-streaming) response."""

    lp: list[dict[str, Any]] = field(default_factory=list)
    tc: list[dict[str, Any]] = field(default_factory=list)
    all_lp: list[dict[str, Any]] = field(default_factory=list)
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)  # tool calls by index
    finish: str | None = None

    def take(self, out: TokenOut) -> str:
        """Record ``out``'s extras; returns its text."""
        if out.logprobs:
            self.lp.extend(out.logprobs)
            self.all_lp.extend(out.logprobs)
        for delta in out.tool_calls:
            self.tc.append(delta)
            self._merge(delta)
        if out.finish:
            self.finish = out.finish
        return out.text

    def _merge(self, delta: dict[str, Any]) -> None:
        call = self.calls.setdefault(
            int(delta.get("index", 0)),
            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if delta.get("id"):
            call["id"] = delta["id"]
        fn = delta.get("function") or {}
        if fn.get("name"):
            call["function"]["name"] += fn["name"]
        if fn.get("arguments"):
            call["function"]["arguments"] += fn["arguments"]

    @property
    def pending(self) -> bool:
        return bool(self.lp or self.tc)

    def flush(self) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]] | None]:
        """The logprobs and deltas for the token event going out now."""
        lp, tc = self.lp or None, self.tc or None
        self.lp, self.tc = [], []
        return lp, tc

    def final(self) -> dict[str, Any]:
        """``DoneEvent`` fields: the whole answer's tool calls and logprobs (if any)."""
        out: dict[str, Any] = {}
        if self.calls:
            out["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        if self.all_lp:
            out["logprobs"] = self.all_lp
        return out
