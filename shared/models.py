"""Pydantic models that cross Redis: jobs, events and the worker registry entry.

Every model carries ``v`` (the protocol version) so that a newer gateway can refuse or adapt to
an older worker's messages instead of misreading them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.capabilities import NONE, Capabilities, Features, to_bits


class Priority(enum.StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @classmethod
    def ordered(cls) -> list[Priority]:
        return [cls.HIGH, cls.NORMAL, cls.LOW]

    @property
    def rank(self) -> int:
        return Priority.ordered().index(self)


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str
    name: str | None = None


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_tokens: int = Field(ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)


class Job(BaseModel):
    """One unit of work: what a worker needs to generate, and its scheduling metadata."""

    model_config = ConfigDict(extra="forbid")
    v: Literal[1] = 1
    id: str
    model: str
    kind: Literal["chat", "completion"]
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    params: SamplingParams
    priority: Priority = Priority.NORMAL
    enqueued_at_ms: int
    deadline_at_ms: int | None = None
    prompt_tokens_estimate: int
    request_id: str
    tenant: str = "anonymous"
    include_usage: bool = False
    continuous_usage: bool = False  # usage on every chunk (vLLM's continuous_usage_stats)
    session: str | None = None  # hashed session key (affinity across the turns of a chat)
    features: Features | None = None  # what it asks for beyond the plain parameters

    def needs(self) -> Capabilities:
        """The features a worker must implement to take this job (none for a plain one)."""
        return NONE if self.features is None else self.features.needs()

    @property
    def need_bits(self) -> int:
        return 0 if self.features is None else to_bits(self.features.needs())

    @property
    def cost_tokens(self) -> int:
        """Capacity a worker reserves for this job: prompt estimate plus the output budget."""
        return self.prompt_tokens_estimate + self.params.max_tokens

    def ref(self) -> JobRef:
        return JobRef(self.id, self.model, self.priority, self.request_id, self.deadline_at_ms)


@dataclass(frozen=True, slots=True)
class JobRef:
    """What names and ranks a job: all that a gateway's stream reads of its job once the job
    is in Redis. A ``Job`` held by each open stream for its whole life was ~2 KB of it (the
    model, its ``SamplingParams``, pydantic's record of the fields set); this is ~0.1 KB."""

    id: str
    model: str
    priority: Priority
    request_id: str
    deadline_at_ms: int | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens the engine reused from its cache (warm prefix)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class StartedEvent(BaseModel):
    """A worker took the job (again, after a failover).

    ``s`` repeats the sequence number of the last event before it: only token and terminal
    events are numbered, so a client sees ids 1..N with no hole where a worker changed.
    """

    t: Literal["started"] = "started"
    s: int
    worker: str
    prompt_tokens: int | None = None  # as the worker's engine counts them


class TokenEvent(BaseModel):
    """Output text; ``lp`` (logprobs entries, OpenAI's chat shape) and ``tc`` (tool-call
    deltas) only where the request asked for them (batches are written without None fields,
    so a plain token costs nothing more)."""

    t: Literal["token"] = "token"
    s: int
    x: str
    lp: list[dict[str, Any]] | None = None
    tc: list[dict[str, Any]] | None = None


class DoneEvent(BaseModel):
    t: Literal["done"] = "done"
    s: int
    finish_reason: Literal["stop", "length", "tool_calls"]
    usage: Usage
    # the whole answer's tool calls and logprobs, for a non-streaming response (the stream
    # had them in its token events)
    tool_calls: list[dict[str, Any]] | None = None
    logprobs: list[dict[str, Any]] | None = None


class ErrorEvent(BaseModel):
    """The job ended without a result; ``code`` matches the OpenAI error envelope's."""

    t: Literal["error"] = "error"
    s: int
    code: str
    message: str
    status: int = 500


Event = Annotated[StartedEvent | TokenEvent | DoneEvent | ErrorEvent, Field(discriminator="t")]
TERMINAL_EVENT_TYPES = ("done", "error")


class EventBatch(BaseModel):
    """What a worker publishes in one go: events of one job in sequence order."""

    v: Literal[1] = 1
    events: list[Event]
    # the fence of the claim that wrote it (``JobStore.emit`` sets it): the gateway takes a
    # pub/sub batch only for the fence it knows from the job's state, else reads the log
    f: int | None = None


class WorkerInfo(BaseModel):
    """A worker's registry entry, refreshed on every heartbeat."""

    v: Literal[1] = 1
    id: str
    host: str
    pid: int
    model: str
    engine: str
    capacity_tokens: int
    max_seqs: int
    tokens_in_use: int = 0
    seqs_in_use: int = 0
    tokens_per_s: float = 0.0
    # the backlog's unit (prompt estimate + max_tokens per job) drained per second: admission
    # divides queued cost by it (0: an older worker, admission falls back to tokens_per_s)
    drain_tokens_per_s: float = 0.0
    seq_tokens_per_s: float = 0.0  # one sequence's recent speed, TTFT included (0: unknown)
    context_tokens: int = 0  # the model's context length (0: unknown); admission checks prompts
    capabilities: list[str] = Field(default_factory=list)  # shared.capabilities.Feature names
    healthy: bool = True
    draining: bool = False
    started_at_ms: int
    heartbeat_at_ms: int
    metrics_port: int | None = None
