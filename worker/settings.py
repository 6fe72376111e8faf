"""Worker settings: environment variables (``SLIPSTREAM_*``) overridden by CLI flags."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.settings import CommonSettings


class SimSettings(CommonSettings):
    """The simulated engine (a test and benchmark tool, not a model)."""

    sim_ttft_ms: float = Field(default=20.0, ge=0, description="Simulated time to first token")
    sim_tokens_per_s: float = Field(
        default=100.0, gt=0, description="Simulated decode speed of one sequence"
    )
    sim_slowdown: float = Field(
        default=0.0,
        ge=0,
        description="Per extra concurrent sequence, each token takes this fraction longer",
    )
    sim_fail_prompt: str = Field(
        default="", description="A prompt containing this text makes the simulator fail (tests)"
    )


class WorkerSettings(SimSettings):
    model: str = Field(default="sim-model", description="Model name this worker serves")
    engine: Literal["sim", "llama", "openai"] = Field(default="sim")
    worker_id: str = Field(default="", description="Registry id; default host-pid-random")
    capacity_tokens: int = Field(
        default=8192, gt=0, description="Token budget: sum of (prompt + max_tokens) in flight"
    )
    max_seqs: int = Field(default=8, gt=0, description="Most sequences generated at once")
    aging_normal_s: float = Field(
        default=10.0, ge=0, description="A normal job waiting this long is served before high"
    )
    aging_low_s: float = Field(
        default=30.0, ge=0, description="A low job waiting this long is served before high"
    )
    coalesce_ms: float = Field(
        default=5.0, ge=0, description="Least time between two event batches of one job"
    )
    block_ms: int = Field(default=2000, gt=0, description="Longest blocking read on idle queues")
    drain_grace_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long in-flight jobs may finish"
    )
    metrics_port: int | None = Field(default=None, description="Port for the worker's /metrics")
    max_deliveries: int = Field(
        default=3, gt=0, description="A job delivered this often goes to the dead-letter stream"
    )
