"""The protocol every engine implements, and what the runner hands it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.capabilities import Capabilities
from shared.models import Job
from shared.prompt import TRANSCRIPT_STOPS, render_transcript
from worker.warm import WarmPrefixes


class EngineError(Exception):
    """Generation failed; the job ends with an error event carrying ``code``."""

    def __init__(self, message: str, *, code: str = "engine_error", status: int = 502) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass(slots=True)
class GenerationStats:
    """What the engine reports about one generation while it runs (the runner reads it)."""

    cached_tokens: int = 0  # prompt tokens reused from the engine's cache (not prefilled)
    prompt_tokens: int = 0  # prompt tokens as the engine counted them (0: not counted)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """Generate ``job`` continuing after ``produced`` (empty unless this is a failover)."""

    job: Job
    produced: str = ""
    produced_tokens: int = 0
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass(frozen=True, slots=True)
class TokenOut:
    """One engine token with what a feature request asked for besides its text: logprobs
    entries (OpenAI's chat shape: ``token``, ``logprob``, ``bytes``, ``top_logprobs``), tool-call
    deltas (the stream shape: ``index``, ``id``, ``type``, ``function``), and a finish reason
    the engine decided (``tool_calls``). Plain tokens are yielded as ``str``."""

    text: str = ""
    logprobs: tuple[dict[str, Any], ...] = ()
    tool_calls: tuple[dict[str, Any], ...] = ()
    finish: str | None = None


class Engine(Protocol):
    name: str
    # What it implements (``shared.capabilities``): the worker advertises it, and takes only
    # jobs that need no more. A declared feature is applied, never ignored.
    capabilities: Capabilities
    # The features whose jobs it can continue exactly after another worker delivered part of
    # the output (failover); a job needing any other fails then instead (docs/reliability.md).
    continuable: Capabilities

    async def start(self) -> None:
        """Load the model or connect to the upstream."""

    async def close(self) -> None:
        """Free everything ``start`` took."""

    def healthy(self) -> bool:
        """False when the engine cannot serve now (the worker stops pulling, registry says so)."""

    def has_room(self) -> bool:
        """False while the engine is busy by its own measure (e.g. an upstream's queue)."""

    def capacity(self) -> tuple[int, int] | None:
        """``(capacity_tokens, max_seqs)`` the engine imposes, or None to use the settings."""

    async def count_prompt_tokens(self, job: Job) -> int:
        """Tokens the job's rendered prompt takes."""

    def warm(self) -> WarmPrefixes | None:
        """The prefixes the engine holds warm (advertised for routing), or None if it cannot
        tell. The engine records into it; the worker reads and advertises it."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[str | TokenOut]:
        """Yield the text of each new token (a ``TokenOut`` where the job asked for logprobs
        or tools); stop at ``max_tokens`` or end of sequence.

        Closing the iterator (``aclose``) must stop generation before the next token.
        """


__all__ = [
    "TRANSCRIPT_STOPS",
    "Engine",
    "EngineError",
    "GenerationRequest",
    "GenerationStats",
    "TokenOut",
    "render_transcript",
]
