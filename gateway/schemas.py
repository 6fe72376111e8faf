"""Request bodies the gateway accepts, validated strictly.

A field that would change the result and that Slipstream does not know is rejected with a
400 (``extra="forbid"``), never silently ignored. Fields the official SDK sends with neutral
values (``n=1``, ``logprobs=false``, penalties of 0, ``user``) are accepted. Features that only
some engines implement (``top_k``, ``logprobs``, ``response_format`` json, ``tools``, ...;
``shared.capabilities``) are validated here and collected by ``features()``: the gateway then
accepts the request only when a live worker of its model implements every one of them.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from shared.capabilities import Features, Tool
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


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(default=None, max_length=4096)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with (and only with) type json_schema")
        return self


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


Penalty = Annotated[float | None, Field(default=None, ge=-2.0, le=2.0)]


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
    n: int = Field(default=1, ge=1, le=16)
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    # vLLM's sampling extensions (0 / 1 / None: off)
    top_k: int | None = Field(default=None, ge=-1, le=1_000_000)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None, max_length=1024
    )
    ignore_eos: StrictBool | None = None  # GuideLLM sends it to fix the output length
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

    @field_validator("temperature", "top_p", "min_p", "repetition_penalty", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if value is None:
            return None
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

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value and not all(k.isdigit() and len(k) <= 9 for k in value):
            raise ValueError("keys must be token ids (decimal strings)")
        return value

    def features(self) -> Features | None:
        """What the request asks for beyond the plain parameters (None: nothing). A request
        that sets none of ``Features``' fields asks for nothing (their defaults are "off"):
        most requests, answered without building the model (~15 µs of the gateway's)."""
        if self.model_fields_set.isdisjoint(Features.model_fields):
            return None
        f = Features(
            top_k=max(0, self.top_k or 0),
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self.logit_bias or None,
            n=self.n,
            ignore_eos=bool(self.ignore_eos),
            **self._more_features(),
        )
        return f if f.needs() else None

    def _more_features(self) -> dict[str, Any]:
        return {}


class ChatCompletionRequest(_CommonRequest):
    messages: list[InboundMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None

    def output_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice is not None and not self.tools:
            raise ValueError("tool_choice needs tools")
        return self

    def _more_features(self) -> dict[str, Any]:
        rf = self.response_format
        choice = self.tool_choice
        return {
            "logprobs": bool(self.logprobs),
            "top_logprobs": self.top_logprobs or 0,
            "response_format": None
            if rf is None or rf.type == "text"
            else rf.model_dump(by_alias=True, exclude_none=True),
            "tools": self.tools,
            "tool_choice": choice.model_dump() if isinstance(choice, BaseModel) else choice,
        }


class CompletionRequest(_CommonRequest):
    prompt: str
    echo: Literal[False] | None = None
    logprobs: None = None
    suffix: None = None
    best_of: Literal[1] | None = None
