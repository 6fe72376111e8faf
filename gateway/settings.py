"""Gateway settings: environment variables (``SLIPSTREAM_*``) overridden by CLI flags."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import NoDecode

from shared.affinity import AffinityPolicy
from shared.settings import CommonSettings


class QueueLimit(BaseModel):
    """One model's queue limits (0: no limit)."""

    jobs: int = Field(default=0, ge=0)
    tokens: int = Field(default=0, ge=0)


class GatewaySettings(CommonSettings):
    host: str = Field(default="127.0.0.1", description="Address the gateway listens on")
    port: int = Field(default=8000, description="Port the gateway listens on")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models accepted even before any worker served them (JSON list or a,b)",
    )
    worker_wait_s: float = Field(
        default=10.0, gt=0, description="How long a job waits for a live worker before a 503"
    )
    request_timeout_s: float = Field(
        default=600.0, gt=0, description="Time budget of a request that sets no deadline"
    )
    stall_timeout_s: float = Field(
        default=60.0, gt=0, description="Longest silence from a started job before it is failed"
    )
    stream_start_s: float = Field(
        default=1.0,
        ge=0,
        description="A streaming job still queued after this long starts its SSE response",
    )
    fair_share_tokens: int = Field(
        default=8192,
        ge=0,
        description="Tokens one tenant may hold in a priority's shared queue; the rest waits "
        "in its own deferred stream (0 = plain FIFO)",
    )
    affinity: bool = Field(
        default=True,
        description="Route a job to the worker that holds its prompt prefix warm, or served "
        "its session's last turn (false: cache-blind pull)",
    )
    affinity_wait_ms: int = Field(
        default=250,
        ge=0,
        le=60_000,
        description="Longest a job waits reserved for its warm worker before any worker may "
        "take it (never more than a quarter of the time left to its deadline)",
    )
    session_ttl_s: float = Field(
        default=900.0,
        gt=0,
        description="How long a session (X-Session-Id, prompt_cache_key or user) remembers "
        "the worker of its last turn",
    )
    default_max_tokens: int = Field(default=256, gt=0, description="max_tokens when unset")
    max_tokens_cap: int = Field(default=4096, gt=0, description="Largest max_tokens accepted")
    max_body_bytes: int = Field(default=1_048_576, gt=0, description="Largest request body")
    max_messages: int = Field(default=256, gt=0, description="Most chat messages in a request")
    max_stop: int = Field(default=4, gt=0, description="Most stop sequences in a request")
    max_stop_chars: int = Field(default=64, gt=0, description="Longest stop sequence")
    max_prompt_tokens: int = Field(
        default=32768, gt=0, description="Largest estimated prompt accepted"
    )
    listener_queue_batches: int = Field(
        default=256, gt=0, description="Event batches buffered per stream before repair-from-log"
    )
    socket_send_buffer_bytes: int = Field(
        default=65536,
        ge=0,
        description="SO_SNDBUF of client connections (bounds kernel memory per slow reader; "
        "0 = kernel autotuning)",
    )
    sse_ping_s: float = Field(default=15.0, gt=0, description="SSE keep-alive comment period")
    send_timeout_s: float = Field(
        default=30.0, gt=0, description="A client that takes longer to accept a write is cut"
    )
    drain_grace_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long open streams may finish"
    )
    # --- admission, limits and auth (see docs/admission.md) ------------------------------
    admission: bool = Field(
        default=True,
        description="Refuse (429) a request the fleet's measured throughput cannot finish "
        "before its deadline, and one past the queue limits",
    )
    max_queue_jobs: int = Field(
        default=10_000, ge=0, description="Most jobs queued per model (0: no limit)"
    )
    max_queue_tokens: int = Field(
        default=0, ge=0, description="Most tokens (prompt + max_tokens) queued per model (0: none)"
    )
    queue_limits: dict[str, QueueLimit] = Field(
        default_factory=dict,
        description='Per-model limits overriding the two above, JSON: {"model": {"jobs": N, '
        '"tokens": N}}',
    )
    queue_reserve: float = Field(
        default=0.1,
        ge=0,
        lt=0.5,
        description="Share of the queue limits each priority above low keeps for itself: low "
        "may fill 80%, normal 90%, high 100%",
    )
    admission_backlog_max_age_s: float = Field(
        default=0.05,
        ge=0,
        description="Admission weighs a request against a queue backlog read at most this "
        "long ago, plus what this gateway admitted since (0: read it for every request)",
    )
    admission_refresh_s: float = Field(
        default=0.25, gt=0, description="Period of the admission's read of the worker registry"
    )
    throughput_memory_s: float = Field(
        default=300.0,
        gt=0,
        description="Half-life of a worker's best measured throughput, which admission uses "
        "as its drain rate (a worker that is not saturated measures less than it can do)",
    )
    progress_s: float = Field(
        default=1.0, gt=0, description="Period of queue-position comments to a queued stream"
    )
    auth_required: bool = Field(
        default=False,
        description="Require an API key (slipstream keys create); off: every caller is the "
        "tenant 'anonymous', without limits",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    def affinity_policy(self) -> AffinityPolicy | None:
        """The warm-state routing policy jobs are enqueued with (None: affinity off)."""
        if not self.affinity or self.affinity_wait_ms <= 0:
            return None
        return AffinityPolicy(self.affinity_wait_ms, int(self.session_ttl_s * 1000))
