"""``slipstream sim-server``: the simulator as a standalone OpenAI-compatible HTTP server.

A test and benchmark tool, not a model: benchmarks put nginx or haproxy in front of several of
these, and Slipstream's ``openai`` engine can front one. Beyond ``slots`` concurrent sequences
it queues requests internally, as a real engine does. Text is the same as the in-worker ``sim``
engine's for the same request, so every benchmark arm sees identical work.
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
from worker.engine import GenerationRequest
from worker.engines.sim import SimEngine, SimProfile, count_tokens
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


class SimServer:
    def __init__(self, model: str, slots: int, profile: SimProfile) -> None:
        self.model = model
        self.engine = SimEngine(profile)
        self.slots = asyncio.Semaphore(slots)
        self.waiting = 0

    async def tokens(self, job: Job) -> AsyncIterator[str]:
        self.waiting += 1
        async with self.slots:
            self.waiting -= 1
            stops = StopMatcher(job.params.stop)
            stream = self.engine.generate(GenerationRequest(job))
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
        if body.get("stream"):
            return StreamingResponse(self._sse(job, head, chat), media_type="text/event-stream")
        parts = [t async for t in self.tokens(job)]
        usage = {"prompt_tokens": count_tokens(job.prompt or ""), "completion_tokens": len(parts)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        text = "".join(parts)
        finish = "length" if len(parts) >= job.params.max_tokens else "stop"
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        obj = "chat.completion" if chat else "text_completion"
        return JSONResponse({**head, "object": obj, "choices": [choice], "usage": usage})

    async def _sse(self, job: Job, head: dict[str, Any], chat: bool) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        n = 0
        async for text in self.tokens(job):
            n += 1
            choice: dict[str, Any] = {"index": 0, "finish_reason": None}
            if chat:
                choice["delta"] = {"content": text, **({"role": "assistant"} if n == 1 else {})}
            else:
                choice["text"] = text
            yield f"data: {json.dumps({**head, 'object': obj, 'choices': [choice]})}\n\n".encode()
        finish = "length" if n >= job.params.max_tokens else "stop"
        last: dict[str, Any] = {"index": 0, "finish_reason": finish}
        last["delta" if chat else "text"] = {} if chat else ""
        yield f"data: {json.dumps({**head, 'object': obj, 'choices': [last]})}\n\n".encode()
        yield b"data: [DONE]\n\n"

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
    host: str, port: int, model: str, slots: int, ttft_ms: float, tps: float, slowdown: float
) -> None:
    server = SimServer(model, slots, SimProfile(ttft_ms / 1000, tps, slowdown))
    uvicorn.run(server.app(), host=host, port=port, log_level="warning", access_log=False)
