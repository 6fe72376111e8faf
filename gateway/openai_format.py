"""Slipstream events rendered as OpenAI objects: streaming chunks and whole responses.

Chunks are assembled from pre-rendered JSON fragments: the token text is the only part
encoded per token, which keeps the relay cheap at tens of thousands of tokens a second.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import Any, Literal

from shared.errors import error_envelope, error_type_for
from shared.models import DoneEvent, ErrorEvent, Event, StartedEvent, TokenEvent, Usage


def _usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


@dataclass(slots=True)
class ChunkWriter:
    """Renders one response's events as SSE frames (``id:`` = the event's sequence number)."""

    kind: Literal["chat", "completion"]
    response_id: str
    model: str
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))
    role_sent: bool = False
    continuous_usage: bool = False  # usage on every chunk (vLLM's continuous_usage_stats)
    prompt_tokens: int = 0  # from the worker's ``started`` event
    _head: str = ""

    def __post_init__(self) -> None:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        self._head = (
            f'{{"id":{json.dumps(self.response_id)},"object":"{obj}",'
            f'"created":{self.created},"model":{json.dumps(self.model)},"choices":[{{"index":0,'
        )

    def _choice(self, content: str | None, finish: str | None) -> str:
        fin = "null" if finish is None else f'"{finish}"'
        # encode_basestring_ascii is what json.dumps runs for a str, without its ~1 µs of
        # Python around it: the text is the only part of a chunk encoded per token
        if self.kind == "completion":
            text = encode_basestring_ascii(content or "")
            return f'{self._head}"text":{text},"logprobs":null,"finish_reason":{fin}}}]}}'
        if content is not None and self.role_sent:  # every token after the first
            text = encode_basestring_ascii(content)
            tail = f',"logprobs":null,"finish_reason":{fin}}}]}}'
            return f'{self._head}"delta":{{"content":{text}}}{tail}'
        delta: dict[str, str] = {}
        if not self.role_sent:
            delta["role"] = "assistant"
            self.role_sent = True
        if content is not None:
            delta["content"] = content
        return f'{self._head}"delta":{json.dumps(delta)},"logprobs":null,"finish_reason":{fin}}}]}}'

    def _rich(self, event: TokenEvent) -> str:
        """A token that carries logprobs or tool-call deltas (feature requests only)."""
        if self.kind == "completion":
            return self._choice(event.x, None)
        delta: dict[str, Any] = {}
        if not self.role_sent:
            delta["role"] = "assistant"
            self.role_sent = True
        if event.x or not event.tc:
            delta["content"] = event.x
        if event.tc:
            delta["tool_calls"] = event.tc
        lp = "null" if event.lp is None else json.dumps({"content": event.lp})
        return f'{self._head}"delta":{json.dumps(delta)},"logprobs":{lp},"finish_reason":null}}]}}'

    def frames(self, events: Sequence[Event]) -> bytes:
        """SSE frames for a batch of events (``started`` events render as nothing)."""
        out: list[str] = []
        for event in events:
            if isinstance(event, TokenEvent):
                plain = event.lp is None and event.tc is None
                chunk = self._choice(event.x, None) if plain else self._rich(event)
                if self.continuous_usage:
                    chunk = self._with_usage(chunk, event.s)
                out.append(f"id: {event.s}\ndata: {chunk}\n\n")
            elif isinstance(event, StartedEvent):
                self.prompt_tokens = event.prompt_tokens or self.prompt_tokens
            elif isinstance(event, DoneEvent):
                chunk = self._choice(None, event.finish_reason)
                if self.continuous_usage:
                    chunk = chunk[:-1] + f',"usage":{json.dumps(_usage_dict(event.usage))}}}'
                out.append(f"id: {event.s}\ndata: {chunk}\n\n")
                if self.include_usage:
                    usage = json.dumps(_usage_dict(event.usage))
                    tail = self._head[: self._head.index('"choices"')]
                    out.append(f'data: {tail}"choices":[],"usage":{usage}}}\n\n')
                out.append("data: [DONE]\n\n")
            elif isinstance(event, ErrorEvent):
                envelope = error_object(event)
                out.append(f"id: {event.s}\ndata: {json.dumps(envelope)}\n\ndata: [DONE]\n\n")
        return "".join(out).encode()

    def _with_usage(self, chunk: str, completion: int) -> str:
        """``chunk`` with the usage so far: token events are numbered 1..N, so event ``s``
        is the ``s``-th piece of output (a piece is one token, or the few tokens a stop
        sequence held back); the final usage, on the last chunk, is the engine's count."""
        prompt = self.prompt_tokens
        usage = f'"prompt_tokens":{prompt},"completion_tokens":{completion}'
        return f'{chunk[:-1]},"usage":{{{usage},"total_tokens":{prompt + completion}}}}}'


def error_object(event: ErrorEvent) -> dict[str, Any]:
    return error_envelope(event.message, error_type_for(event.status), event.code)


def completion_object(
    kind: Literal["chat", "completion"],
    response_id: str,
    model: str,
    text: str,
    done: DoneEvent,
    created: int,
) -> dict[str, Any]:
    """The whole (non-streaming) response."""
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if done.tool_calls:
            message = {**message, "content": text or None, "tool_calls": done.tool_calls}
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "logprobs": None if done.logprobs is None else {"content": done.logprobs},
            "finish_reason": done.finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
        obj = "text_completion"
    return {
        "id": response_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": _usage_dict(done.usage),
    }
