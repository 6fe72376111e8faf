"""Request bodies the gateway accepts, validated strictly.

A field that would change the result and that Slipstream does not implement is rejected with a
400 (``extra="forbid"``), never silently ignored. Fields the official SDK sends with neutral
values (``n=1``, ``logprobs=false``, penalties of 0, ``user``) are accepted.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from shared.models import ChatMessage, Priority


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class InboundMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def to_message(self) -> ChatMessage:
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        return ChatMessage(role=self.role, content=text, name=self.name)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM: usage on every chunk


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


Neutral = Annotated[float | None, Field(default=None, ge=0.0, le=0.0)]


class _CommonRequest(BaseModel):
    """Fields shared by chat and completion requests."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(min_length=1, max_length=256)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    presence_penalty: Neutral = None
    frequency_penalty: Neutral = None
    user: str | None = Field(default=None, max_length=256)
    prompt_cache_key: str | None = Field(default=None, max_length=256)
    # Accepted because they do not change what is generated (bookkeeping, routing hints).
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, max_length=16
    )
    store: StrictBool | None = None
    service_tier: str | None = Field(default=None, max_length=32)
    safety_identifier: str | None = Field(default=None, max_length=256)
    # Slipstream extensions (also accepted as X-Priority / X-Deadline-Ms headers).
    priority: Priority | None = None
    deadline_ms: int | None = Field(default=None, ge=1, le=86_400_000)

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a number")
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return float(value)

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, value: Any) -> Any:
        return Priority(value) if isinstance(value, str) else value

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def output_budget(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(_CommonRequest):
    messages: list[InboundMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: Literal[False] | None = None
    response_format: ResponseFormat | None = None
    parallel_tool_calls: StrictBool | None = None  # meaningless without tools (refused)

    def output_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_CommonRequest):
    prompt: str
    echo: Literal[False] | None = None
    logprobs: None = None
    suffix: None = None
    best_of: Literal[1] | None = None
