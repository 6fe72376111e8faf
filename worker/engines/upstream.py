"""Any OpenAI-compatible server as the engine: ``--engine openai``.

Works with vLLM, llama.cpp's server, Ollama, ``python -m llama_cpp.server`` and Slipstream's
own simulator. Lessons from those servers shape the requests: ``max_tokens`` is always sent
(some ignore ``max_completion_tokens``), usage is counted here (some ignore
``stream_options``), and every wait is bounded (connect, silence between chunks, whole
generation) so a stalled upstream fails the job instead of hanging it.

Each streamed chunk that carries text is one token for the worker's accounting (the servers
above send one token per chunk; a server that batches several counts them as one).

Request features (``top_k``, penalties, ``logit_bias``, ``logprobs``, ``response_format``,
``tools``) are passed through as sent, and the upstream's tool-call deltas and logprobs are
relayed unchanged; which features the upstream implements is configured
(``SLIPSTREAM_UPSTREAM_CAPABILITIES``, by default what vLLM implements). A failover
continuation goes through ``/v1/completions`` (the delivered text appended to the prompt), so
only the sampling features continue; the others fail then (``worker/features.py``).
A background probe keeps ``healthy()`` (``GET /v1/models``, else ``/health``) and
``has_room()`` (vLLM's Prometheus ``/metrics``: no waiting requests, KV cache use below a
threshold; always true where ``/metrics`` is absent) current.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack, aclosing, suppress
from dataclasses import dataclass
from typing import Any, cast

import httpx

from shared.capabilities import SAMPLING, Feature, Features, parse_names
from shared.models import Job
from shared.prefix import block_hashes
from worker.engine import (
    TRANSCRIPT_STOPS,
    EngineError,
    GenerationRequest,
    TokenOut,
    render_transcript,
)
from worker.settings import WorkerSettings
from worker.warm import WarmPrefixes

UPSTREAM_WARM_BLOCKS = 4096  # ~256k tokens of recently sent prefixes
KV_METRICS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
WAITING_METRIC = "vllm:num_requests_waiting"


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str
    model: str
    api_key: str = ""
    timeout_s: float = 300.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    probe_s: float = 2.0
    max_kv_use: float = 0.9
    capabilities: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, s: WorkerSettings) -> UpstreamConfig:
        if not s.upstream_url:
            raise ValueError("--engine openai needs --upstream-url")
        return cls(
            url=s.upstream_url.rstrip("/"),
            model=s.upstream_model or s.model,
            api_key=s.upstream_api_key,
            timeout_s=s.upstream_timeout_s,
            connect_timeout_s=s.upstream_connect_timeout_s,
            read_timeout_s=s.upstream_read_timeout_s,
            probe_s=s.upstream_probe_s,
            max_kv_use=s.upstream_max_kv_use,
            capabilities=frozenset(parse_names(s.upstream_capabilities.split(","))),
        )


def parse_metrics(text: str) -> dict[str, list[float]]:
    """Prometheus text exposition: every sample's value, by metric name (labels dropped)."""
    samples: dict[str, list[float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(None, 1)[0]
        rest = line.rsplit("}", 1)[1] if "{" in line else line[len(name) :]
        with suppress(ValueError, IndexError):
            value = float(rest.split()[0])  # a timestamp may follow the value
            samples.setdefault(name, []).append(value)
    return samples


def room_from_metrics(samples: dict[str, list[float]], max_kv_use: float) -> bool:
    """False while the upstream queues requests or its KV cache is fuller than allowed."""
    if sum(samples.get(WAITING_METRIC, [])) > 0:
        return False
    kv = [v for name in KV_METRICS for v in samples.get(name, [])]
    return not kv or max(kv) <= max_kv_use


def chunk_text(line: str, chat: bool) -> tuple[str | None, bool]:
    """One SSE line -> (text or None, finished). Raises ``EngineError`` on a malformed chunk."""
    if not line.startswith("data:"):
        return None, False  # blank separators, comments (": ping"), "event:" and "id:" lines
    data = line[5:].strip()
    if data == "[DONE]":
        return None, True
    try:
        chunk = json.loads(data)
        if "error" in chunk:
            raise EngineError(f"upstream error: {chunk['error']}", code="upstream_error")
        if not chunk.get("choices"):
            return None, False  # e.g. a usage-only chunk
        choice = chunk["choices"][0]
        text = choice["delta"].get("content") if chat else choice.get("text")
        if text is not None and not isinstance(text, str):
            raise TypeError(f"text is {type(text).__name__}")
        return text or None, choice.get("finish_reason") is not None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        msg = f"upstream sent a malformed chunk: {data[:200]!r}"
        raise EngineError(msg, code="upstream_error") from exc


def chunk_out(line: str, chat: bool) -> tuple[str | TokenOut | None, bool]:
    """``chunk_text`` for a feature request: tool-call deltas, logprobs and a ``tool_calls``
    finish come along unchanged, as a ``TokenOut``."""
    rich = '"tool_calls"' in line or '"logprobs":{' in line or '"logprobs": {' in line
    if not chat or not rich or not line.startswith("data:"):
        return chunk_text(line, chat)
    data = line[5:].strip()
    try:
        choice = json.loads(data)["choices"][0]
        delta = choice.get("delta") or {}
        text = delta.get("content") or ""
        lp = (choice.get("logprobs") or {}).get("content") or ()
        calls = delta.get("tool_calls") or ()
        if not isinstance(text, str) or not all(isinstance(x, dict) for x in [*lp, *calls]):
            raise TypeError("malformed delta")
        finish = choice.get("finish_reason")
        out = TokenOut(
            text, tuple(lp), tuple(calls), "tool_calls" if finish == "tool_calls" else None
        )
        return out, finish is not None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        msg = f"upstream sent a malformed chunk: {data[:200]!r}"
        raise EngineError(msg, code="upstream_error") from exc


def feature_fields(f: Features, full: bool) -> dict[str, Any]:
    """The request's features as upstream body fields (only non-neutral ones); ``full``
    False (a continuation through /v1/completions): the sampling ones only."""
    body: dict[str, Any] = {}
    if f.top_k > 0:
        body["top_k"] = f.top_k
    if f.min_p > 0:
        body["min_p"] = f.min_p
    if f.repetition_penalty != 1.0:
        body["repetition_penalty"] = f.repetition_penalty
    if f.presence_penalty:
        body["presence_penalty"] = f.presence_penalty
    if f.frequency_penalty:
        body["frequency_penalty"] = f.frequency_penalty
    if f.logit_bias:
        body["logit_bias"] = f.logit_bias
    if f.ignore_eos:
        body["ignore_eos"] = True
    if not full:
        return body
    if f.logprobs:
        body["logprobs"] = True
        if f.top_logprobs:
            body["top_logprobs"] = f.top_logprobs
    if f.response_format is not None:
        body["response_format"] = f.response_format
    if f.tools:
        body["tools"] = [t.model_dump(exclude_none=True) for t in f.tools]
        if f.tool_choice is not None:
            body["tool_choice"] = f.tool_choice
    return body


def status_error(response: httpx.Response, body: bytes) -> EngineError:
    detail = body[:300].decode(errors="replace")
    message = f"upstream answered {response.status_code}: {detail}"
    if response.status_code in (429, 503):
        return EngineError(message, code="upstream_busy", status=503)
    if response.status_code in (400, 404, 413, 422):
        return EngineError(message, code="upstream_rejected", status=400)
    return EngineError(message, code="upstream_error", status=502)


class UpstreamEngine:
    """An OpenAI-compatible HTTP server (``--engine openai``)."""

    name = "openai"
    # a continuation goes through /v1/completions (see the docstring)
    continuable = SAMPLING | {Feature.IGNORE_EOS}

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.capabilities = frozenset(parse_names(config.capabilities))
        self.client: httpx.AsyncClient | None = None
        self.prober: asyncio.Task[None] | None = None
        self.up = False
        self.room = True
        # What the upstream probably holds warm: vLLM and SGLang cache prefixes on their own
        # and do not say which, so this is an estimate (an LRU of what we sent it), as the
        # Gateway API Inference Extension's approximate prefix scorer keeps per pod.
        self.recent = WarmPrefixes(max_blocks=UPSTREAM_WARM_BLOCKS)

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> UpstreamEngine:
        return cls(UpstreamConfig.from_settings(settings))

    # --- lifecycle and probes -------------------------------------------------------------
    async def start(self) -> None:
        c = self.config
        headers = {"Authorization": f"Bearer {c.api_key}"} if c.api_key else {}
        self.client = httpx.AsyncClient(
            base_url=c.url,
            headers=headers,
            timeout=httpx.Timeout(c.read_timeout_s, connect=c.connect_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        await self.probe()
        self.prober = asyncio.create_task(self._probe_loop(), name="upstream-probe")

    async def close(self) -> None:
        if self.prober is not None:
            self.prober.cancel()
            with suppress(asyncio.CancelledError):
                await self.prober
            self.prober = None
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        self.up = False

    def warm(self) -> WarmPrefixes | None:
        return self.recent

    def healthy(self) -> bool:
        return self.up

    def has_room(self) -> bool:
        return self.room

    def capacity(self) -> tuple[int, int] | None:
        return None

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.probe_s)
            await self.probe()

    async def probe(self) -> None:
        """Refresh ``up`` and ``room`` once (never raises)."""
        assert self.client is not None
        timeout = httpx.Timeout(
            max(self.config.probe_s, 1.0), connect=self.config.connect_timeout_s
        )
        try:
            response = await self.client.get("/v1/models", timeout=timeout)
            if response.status_code == 404:
                response = await self.client.get("/health", timeout=timeout)
            self.up = response.is_success
        except httpx.HTTPError:
            self.up = False
        if self.up:
            with suppress(httpx.HTTPError, ValueError):  # no fresh metrics: keep the last
                await self._probe_metrics(timeout)

    async def _probe_metrics(self, timeout: httpx.Timeout) -> None:
        assert self.client is not None
        response = await self.client.get("/metrics", timeout=timeout)
        if response.status_code == 404:
            self.room = True  # no vLLM metrics: the upstream's own queue is not visible
        elif response.is_success:
            self.room = room_from_metrics(parse_metrics(response.text), self.config.max_kv_use)

    # --- requests -------------------------------------------------------------------------
    async def count_prompt_tokens(self, job: Job) -> int:
        if job.kind == "chat":
            text = "".join(m.content for m in job.messages or [])
            return len(text) // 4 + 4 * len(job.messages or []) + 1
        return len(render_transcript(job)) // 4 + 1

    def payload(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        """The upstream path and JSON body generating ``request`` (continuation included)."""
        job, params = request.job, request.job.params
        body: dict[str, Any] = {
            "model": self.config.model,
            "stream": True,
            "max_tokens": params.max_tokens - request.produced_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        stops = list(params.stop)
        if job.kind == "chat" and not request.produced:
            path = "/v1/chat/completions"
            body["messages"] = [m.model_dump(exclude_none=True) for m in job.messages or []]
        else:
            path = "/v1/completions"
            body["prompt"] = render_transcript(job) + request.produced
            if job.kind == "chat":
                stops += [s for s in TRANSCRIPT_STOPS if s not in stops]
        if stops:
            body["stop"] = stops
        if job.features is not None:
            body.update(feature_fields(job.features, full=path == "/v1/chat/completions"))
        return path, body

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str | TokenOut]:
        produced: list[str] = [request.produced]
        try:
            async for out in self._generate(request):
                produced.append(out if isinstance(out, str) else out.text)
                yield out
        finally:  # the upstream now holds this prompt and answer (the next turn's prefix)
            self.recent.add(block_hashes(render_transcript(request.job) + "".join(produced)))

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[str | TokenOut]:
        if self.client is None:
            raise EngineError("upstream engine not started", code="engine_unavailable", status=503)
        path, body = self.payload(request)
        if body["max_tokens"] <= 0:
            return
        chat = path.endswith("/chat/completions")
        parse = chunk_text if request.job.features is None else chunk_out
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeout_s
        try:
            async with AsyncExitStack() as stack:
                async with asyncio.timeout_at(deadline):
                    response = await stack.enter_async_context(
                        self.client.stream("POST", path, json=body)
                    )
                    if not response.is_success:
                        raise status_error(response, await response.aread())
                raw = cast(AsyncGenerator[str, None], response.aiter_lines())
                lines = await stack.enter_async_context(aclosing(raw))
                count = 0
                while count < body["max_tokens"]:
                    async with asyncio.timeout_at(deadline):
                        line = await anext(lines, None)
                    if line is None:
                        raise EngineError(
                            "upstream closed the stream before it finished", code="upstream_error"
                        )
                    text, finished = parse(line, chat)
                    if text:
                        count += 1
                        yield text
                    if finished:
                        return
        except TimeoutError as exc:
            msg = f"upstream took longer than {self.config.timeout_s:g}s"
            raise EngineError(msg, code="upstream_timeout", status=504) from exc
        except httpx.TimeoutException as exc:
            msg = f"upstream timed out ({type(exc).__name__})"
            raise EngineError(msg, code="upstream_timeout", status=504) from exc
        except httpx.HTTPError as exc:
            if isinstance(exc, httpx.ConnectError):
                self.up = False
            msg = f"upstream connection failed: {type(exc).__name__}: {exc}"
            raise EngineError(msg, code="upstream_error") from exc
