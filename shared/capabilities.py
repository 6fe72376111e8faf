"""Request features an engine may or may not implement, and the parameters that ask for them.

The rule: a request that asks for a feature (a parameter with a non-neutral value) is accepted
only when a live worker of its model implements it, and only such a worker takes it. Neutral
values (``top_k`` 0, penalties 0, ``n`` 1, ``logprobs`` false, ``response_format`` text,
``ignore_eos`` false)
need nothing, so a plain request is routed exactly as before.

A worker's set travels as names in its registry entry (``WorkerInfo.capabilities``, what the
gateway checks) and as a bit mask in its ``worker:<id>`` hash and in ``PULL``'s options (what
the pull script checks); a job's needs travel as a bit mask in its hash (``need``). Bits are
fixed by the order below: new features go at the end.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Feature(enum.StrEnum):
    TOP_K = "top_k"
    MIN_P = "min_p"
    REPETITION_PENALTY = "repetition_penalty"
    PRESENCE_PENALTY = "presence_penalty"
    FREQUENCY_PENALTY = "frequency_penalty"
    LOGIT_BIAS = "logit_bias"
    LOGPROBS = "logprobs"  # with top_logprobs
    N = "n"  # more than one choice
    JSON_OBJECT = "json_object"  # response_format {"type": "json_object"}
    JSON_SCHEMA = "json_schema"  # response_format {"type": "json_schema", ...}
    TOOLS = "tools"  # tools, tool_choice, tool-call deltas
    IGNORE_EOS = "ignore_eos"  # vLLM's: generate max_tokens, past end-of-sequence tokens

    @property
    def bit(self) -> int:
        return 1 << list(Feature).index(self)

    @property
    def param(self) -> str:
        """The request parameter that asks for it (what a refusal names)."""
        json_kinds = (Feature.JSON_OBJECT, Feature.JSON_SCHEMA)
        return "response_format" if self in json_kinds else self.value


Capabilities = frozenset[Feature]
NONE: Capabilities = frozenset()
SAMPLING: Capabilities = frozenset(
    {
        Feature.TOP_K,
        Feature.MIN_P,
        Feature.REPETITION_PENALTY,
        Feature.PRESENCE_PENALTY,
        Feature.FREQUENCY_PENALTY,
        Feature.LOGIT_BIAS,
    }
)


def to_bits(caps: Iterable[Feature]) -> int:
    out = 0
    for f in caps:
        out |= f.bit
    return out


def from_bits(bits: int) -> Capabilities:
    return frozenset(f for f in Feature if bits & f.bit)


def parse_names(names: Iterable[str]) -> Capabilities:
    """Feature names (settings, registry); an unknown name is a ValueError naming it."""
    out: set[Feature] = set()
    for name in names:
        name = name.strip()
        if not name:
            continue
        if name == "all":
            out.update(Feature)
            continue
        try:
            out.add(Feature(name))
        except ValueError:
            known = ", ".join(f.value for f in Feature)
            raise ValueError(f"unknown capability {name!r}; known: {known}, all") from None
    return frozenset(out)


def known(names: Iterable[str]) -> Capabilities:
    """The features among ``names`` this version knows (a newer worker's others are skipped)."""
    values = {f.value: f for f in Feature}
    return frozenset(values[n] for n in names if n in values)


def first_missing(needs: Capabilities, have: Capabilities) -> Feature | None:
    """The first needed feature (in declaration order) that ``have`` lacks."""
    return next((f for f in Feature if f in needs and f not in have), None)


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = Field(default=None, max_length=4096)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: ToolFunction


class Features(BaseModel):
    """What a request asks for beyond temperature/top_p/seed/stop (None on a plain job).

    Values are the request's, already validated by the gateway; an engine applies them or,
    having declared the feature, fails the job with a clear error (never ignores them).
    """

    model_config = ConfigDict(extra="forbid")
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1: off (vLLM/HF: divides positive logits of seen tokens)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    response_format: dict[str, Any] | None = None  # json_object | json_schema, as sent
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    ignore_eos: bool = False

    def needs(self) -> Capabilities:
        out: set[Feature] = set()
        if self.top_k > 0:
            out.add(Feature.TOP_K)
        if self.min_p > 0:
            out.add(Feature.MIN_P)
        if self.repetition_penalty != 1.0:
            out.add(Feature.REPETITION_PENALTY)
        if self.presence_penalty:
            out.add(Feature.PRESENCE_PENALTY)
        if self.frequency_penalty:
            out.add(Feature.FREQUENCY_PENALTY)
        if self.logit_bias:
            out.add(Feature.LOGIT_BIAS)
        if self.logprobs:
            out.add(Feature.LOGPROBS)
        if self.n > 1:
            out.add(Feature.N)
        kind = (self.response_format or {}).get("type")
        if kind == "json_object":
            out.add(Feature.JSON_OBJECT)
        elif kind == "json_schema":
            out.add(Feature.JSON_SCHEMA)
        if self.tools:
            out.add(Feature.TOOLS)
        if self.ignore_eos:
            out.add(Feature.IGNORE_EOS)
        return frozenset(out)

    def json_schema(self) -> dict[str, Any] | None:
        """The schema ``response_format`` asks for ({} for json_object: any object), or None."""
        rf = self.response_format or {}
        if rf.get("type") == "json_object":
            return {"type": "object"}
        if rf.get("type") == "json_schema":
            schema = (rf.get("json_schema") or {}).get("schema")
            return schema if isinstance(schema, dict) else {}
        return None
