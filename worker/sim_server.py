"""``slipstream sim-server``: the simulator as a standalone OpenAI-compatible HTTP server.

A test and benchmark tool, not a model: benchmarks put nginx or haproxy in front of several of
these, and Slipstream's ``openai`` engine can front one. Beyond ``slots`` concurrent sequences
it queues requests internally, as a real engine does. Text is the same as the in-worker ``sim``
engine's for the same request, so every benchmark arm sees identical work. Each process models
its own prefix cache (the engine's), and reports what it reused as
``usage.prompt_tokens_details.cached_tokens`` (streamed too, with
``stream_options.include_usage``), as vLLM and the gateway do. It also plays tool calls and
logprobs as vLLM sends them (``worker/engines/sim_features.py``), for the ``openai`` engine's
tests.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from shared.models import ChatMessage, Job, SamplingParams
from shared.prompt import render_transcript
from worker.engine import GenerationRequest
from worker.engines.sim import SimEngine, SimProfile, count_tokens
from worker.engines.sim_features import logprob_entry, tool_call_deltas, wants_tool, whole_call
from worker.stops import StopMatcher


def _job(body: dict[str, Any], chat: bool) -> Job:
    max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
    stop = body.get("stop") or []
    messages = (
        [ChatMessage(role=m["role"], content=m["content"]) for m in body["messages"]]
        if chat
        else None
    )
    return Job(
        id=uuid.uuid4().hex,
        model=str(body.get("model", "sim-model")),
        kind="chat" if chat else "completion",
        messages=messages,
        prompt=None if chat else str(body.get("prompt", "")),
        params=SamplingParams(
            max_tokens=max_tokens,
            temperature=float(body.get("temperature", 1.0)),
            seed=body.get("seed"),
            stop=[stop] if isinstance(stop, str) else list(stop),
        ),
        enqueued_at_ms=int(time.time() * 1000),
        prompt_tokens_estimate=1,
        request_id=uuid.uuid4().hex,
    )


def _usage(request: GenerationRequest, completion_tokens: int) -> dict[str, Any]:
    stats = request.stats
    prompt_tokens = stats.prompt_tokens or count_tokens(render_transcript(request.job))
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": min(stats.cached_tokens, prompt_tokens)},
    }


class SimServer:
    def __init__(self, model: str, slots: int, profile: SimProfile) -> None:
        self.model = model
        self.engine = SimEngine(profile)
        self.slots = asyncio.Semaphore(slots)
        self.waiting = 0

    async def tokens(self, request: GenerationRequest) -> AsyncIterator[str]:
        job = request.job
        self.waiting += 1
        async with self.slots:
            self.waiting -= 1
            stops = StopMatcher(job.params.stop)
            stream = self.engine.generate(request)
            try:
                async for text in stream:
                    out = stops.feed(text)
                    if out:
                        yield out
                    if stops.stopped:
                        break
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

    async def handle(self, request: Request, chat: bool) -> Response:
        body = await request.json()
        job = _job(body, chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + job.id
        head = {"id": rid, "created": int(time.time()), "model": job.model}
        tool = wants_tool(body) if chat else None
        if tool is not None:
            return self._tool_call(body, head, tool, job)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            lp = int(body.get("top_logprobs") or 0) if chat and body.get("logprobs") else -1
            return StreamingResponse(
                self._sse(job, head, chat, include_usage, lp), media_type="text/event-stream"
            )
        generation = GenerationRequest(job)
        parts = [t async for t in self.tokens(generation)]
        usage = _usage(generation, len(parts))
        text = "".join(parts)
        finish = "length" if len(parts) >= job.params.max_tokens else "stop"
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat and body.get("logprobs"):
            top = int(body.get("top_logprobs") or 0)
            entries = [logprob_entry(t, i, top) for i, t in enumerate(parts)]
            choice["logprobs"] = {"content": entries}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        obj = "chat.completion" if chat else "text_completion"
        return JSONResponse({**head, "object": obj, "choices": [choice], "usage": usage})

    async def _sse(
        self, job: Job, head: dict[str, Any], chat: bool, include_usage: bool, lp: int = -1
    ) -> AsyncIterator[bytes]:
        """The stream; ``lp`` >= 0: logprobs with that many alternatives on every token."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        n = 0
        request = GenerationRequest(job)
        async for text in self.tokens(request):
            n += 1
            choice: dict[str, Any] = {"index": 0, "finish_reason": None}
            if chat:
                choice["delta"] = {"content": text, **({"role": "assistant"} if n == 1 else {})}
                if lp >= 0:
                    choice["logprobs"] = {"content": [logprob_entry(text, n - 1, lp)]}
            else:
                choice["text"] = text
            yield f"data: {json.dumps({**head, 'object': obj, 'choices': [choice]})}\n\n".encode()
        finish = "length" if n >= job.params.max_tokens else "stop"
        last: dict[str, Any] = {"index": 0, "finish_reason": finish}
        last["delta" if chat else "text"] = {} if chat else ""
        yield f"data: {json.dumps({**head, 'object': obj, 'choices': [last]})}\n\n".encode()
        if include_usage:
            chunk = {**head, "object": obj, "choices": [], "usage": _usage(request, n)}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    def _tool_call(
        self, body: dict[str, Any], head: dict[str, Any], tool: dict[str, Any], job: Job
    ) -> Response:
        """The simulated model calls ``tool`` (one call), streamed or whole."""
        seed = render_transcript(job)
        deltas = tool_call_deltas(tool, seed)
        usage = _usage(GenerationRequest(job), len(deltas))
        if not body.get("stream"):
            message = {"role": "assistant", "content": None, "tool_calls": [whole_call(deltas)]}
            choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
            return JSONResponse(
                {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
            )

        async def sse() -> AsyncIterator[bytes]:
            obj = {**head, "object": "chat.completion.chunk"}
            for i, delta in enumerate(deltas):
                d: dict[str, Any] = {"tool_calls": [delta]}
                if i == 0:
                    d = {"role": "assistant", "content": None, **d}
                choice = {"index": 0, "delta": d, "finish_reason": None}
                yield f"data: {json.dumps({**obj, 'choices': [choice]})}\n\n".encode()
                await asyncio.sleep(0)
            last = {"index": 0, "delta": {}, "finish_reason": "tool_calls"}
            yield f"data: {json.dumps({**obj, 'choices': [last]})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    def app(self) -> Starlette:
        async def chat(request: Request) -> Response:
            return await self.handle(request, True)

        async def completions(request: Request) -> Response:
            return await self.handle(request, False)

        async def models(request: Request) -> Response:
            return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model"}]})

        async def health(request: Request) -> Response:
            return JSONResponse({"status": "ok", "waiting": self.waiting})

        return Starlette(
            routes=[
                Route("/v1/chat/completions", chat, methods=["POST"]),
                Route("/v1/completions", completions, methods=["POST"]),
                Route("/v1/models", models),
                Route("/health", health),
            ]
        )


def serve_sim(
    host: str,
    port: int,
    model: str,
    slots: int,
    ttft_ms: float,
    tps: float,
    slowdown: float,
    prefill_tps: float = 0.0,
    cache_tokens: int = 32768,
) -> None:
    profile = SimProfile(
        ttft_ms / 1000,
        tps,
        slowdown,
        prefill_tokens_per_s=prefill_tps,
        cache_tokens=cache_tokens,
    )
    server = SimServer(model, slots, profile)
    uvicorn.run(server.app(), host=host, port=port, log_level="warning", access_log=False)
