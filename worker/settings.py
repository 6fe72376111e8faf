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
    sim_prefill_tokens_per_s: float = Field(
        default=0.0,
        ge=0,
        description="Simulated prefill speed: prompt tokens not in the simulated prefix cache "
        "add 1/this seconds each to the time to first token (0: prefill is free)",
    )
    sim_cache_tokens: int = Field(
        default=32768, ge=0, description="Size of the simulated prefix cache, in tokens"
    )
    sim_fail_prompt: str = Field(
        default="", description="A prompt containing this text makes the simulator fail (tests)"
    )
    sim_crash_prompt: str = Field(
        default="",
        description="A prompt containing this text kills the simulating worker process (tests)",
    )


class LlamaSettings(CommonSettings):
    """The in-process llama.cpp engine (``--engine llama``)."""

    model_path: str = Field(
        default="",
        description="GGUF file for --engine llama; empty: the packaged Gemma 3 270M (base)",
    )
    slots: int = Field(
        default=0,
        ge=0,
        description="Deprecated alias of --max-seqs for the llama engine (0: use --max-seqs)",
    )
    n_ctx: int = Field(
        default=8192,
        gt=0,
        description="KV cells of the one llama.cpp context, shared by every sequence (and the "
        "longest prompt + output of one)",
    )
    threads: int = Field(
        default=0, ge=0, description="CPU threads of the llama.cpp context; 0: every core"
    )
    llama_cache_share: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Share of the KV cells finished sequences' prefixes may keep for reuse",
    )


class UpstreamSettings(CommonSettings):
    """The OpenAI-compatible upstream engine (``--engine openai``)."""

    upstream_url: str = Field(
        default="", description="Base URL of the upstream server, e.g. http://127.0.0.1:8000"
    )
    upstream_model: str = Field(
        default="", description="Model name sent upstream; empty: the worker's --model"
    )
    upstream_api_key: str = Field(
        default="", description="Bearer token sent upstream (empty: no Authorization header)"
    )
    upstream_timeout_s: float = Field(
        default=300.0, gt=0, description="Longest a whole upstream generation may take"
    )
    upstream_connect_timeout_s: float = Field(
        default=5.0, gt=0, description="Longest wait to connect to the upstream"
    )
    upstream_read_timeout_s: float = Field(
        default=30.0, gt=0, description="Longest silence between two streamed upstream chunks"
    )
    upstream_probe_s: float = Field(
        default=2.0, gt=0, description="Period of the upstream health and /metrics probe"
    )
    upstream_max_kv_use: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Stop pulling while the upstream's KV cache use (vLLM /metrics) is above this",
    )
    upstream_capabilities: str = Field(
        default="top_k,min_p,repetition_penalty,presence_penalty,frequency_penalty,logit_bias,"
        "logprobs,json_object,json_schema,tools,ignore_eos",
        description="Request features the upstream implements, passed through (comma-separated "
        "names from shared/capabilities.py, or all; default: what vLLM implements, except n)",
    )
    sim_crash_prompt: str = Field(
        default="",
        description="A prompt containing this text kills the simulating worker process (tests)",
    )


class WorkerSettings(SimSettings, LlamaSettings, UpstreamSettings):
    model: str = Field(default="sim-model", description="Model name this worker serves")
    engine: Literal["sim", "llama", "openai"] = Field(default="sim")
    worker_id: str = Field(default="", description="Registry id; default host-pid-random")
    capacity_tokens: int = Field(
        default=8192, gt=0, description="Token budget: sum of (prompt + max_tokens) in flight"
    )
    max_seqs: int = Field(default=8, gt=0, description="Most sequences generated at once")
    context_tokens: int = Field(
        default=0,
        ge=0,
        description="Context length advertised to gateways, which refuse longer prompts with "
        "a 400; 0: the engine's own (llama: n_ctx) or unknown",
    )
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
    metrics_host: str = Field(default="0.0.0.0", description="Address /metrics listens on")
    max_deliveries: int = Field(
        default=3, gt=0, description="A job delivered this often goes to the dead-letter stream"
    )
