"""What ``slipstream sim-server`` plays for feature requests, as an upstream would send them.

A test tool, like the simulator itself: with ``tools`` (and ``tool_choice`` not ``none``) it
answers with one call to the chosen (else the first) tool, arguments built from the tool's
parameter schema and streamed in pieces, finish reason ``tool_calls``; with ``logprobs`` each
token carries made-up but deterministic log probabilities (a hash of the token and its
position: plausible shape, no meaning). It lets the ``openai`` engine's relay be tested
against the same bytes vLLM would send, without a model.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from worker.engines.sim import VOCABULARY

ARGUMENT_PIECE = 8  # characters of arguments per streamed delta


def wants_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The tool the simulated model calls, or None (no tools, or ``tool_choice`` none)."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice", "auto")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        for tool in tools:
            if tool.get("function", {}).get("name") == name:
                return dict(tool["function"])
    return dict(tools[0]["function"])


def _value(schema: dict[str, Any], seed: str) -> Any:
    kind = schema.get("type")
    if schema.get("enum"):
        return schema["enum"][0]
    digest = int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=4).digest(), "little")
    if kind == "integer":
        return digest % 100
    if kind == "number":
        return (digest % 1000) / 10
    if kind == "boolean":
        return digest % 2 == 0
    if kind == "array":
        return [_value(schema.get("items") or {"type": "string"}, seed + "0")]
    if kind == "object":
        return arguments_for(schema, seed)
    return VOCABULARY[digest % len(VOCABULARY)]


def arguments_for(schema: dict[str, Any] | None, seed: str) -> dict[str, Any]:
    """An object that satisfies a simple JSON schema's ``properties`` (all of them filled)."""
    props = (schema or {}).get("properties") or {}
    return {name: _value(sub or {}, seed + name) for name, sub in props.items()}


def tool_call_deltas(tool: dict[str, Any], seed: str) -> list[dict[str, Any]]:
    """The call as stream deltas: id, type and name first, then the arguments in pieces."""
    args = json.dumps(arguments_for(tool.get("parameters"), seed))
    call_id = "call_" + hashlib.blake2b(seed.encode(), digest_size=8).hexdigest()
    first = {
        "index": 0,
        "id": call_id,
        "type": "function",
        "function": {"name": tool["name"], "arguments": ""},
    }
    pieces = [args[i : i + ARGUMENT_PIECE] for i in range(0, len(args), ARGUMENT_PIECE)]
    return [first] + [{"index": 0, "function": {"arguments": p}} for p in pieces]


def whole_call(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    first = deltas[0]
    args = "".join(d["function"]["arguments"] for d in deltas)
    return {
        "id": first["id"],
        "type": "function",
        "function": {**first["function"], "arguments": args},
    }


def logprob_entry(token: str, position: int, top: int) -> dict[str, Any]:
    """Made-up, deterministic logprobs for ``token`` (chat shape) and ``top`` alternatives:
    the token is the most likely one (the simulator is greedy), the others below it."""

    def lp(text: str, low: float) -> float:
        h = hashlib.blake2b(f"{position}:{text}".encode(), digest_size=4).digest()
        return -round(low + int.from_bytes(h, "little") % 1000 / 1000, 4)

    chosen = lp(token, 0.0)
    others = [" " + w for w in VOCABULARY if " " + w != token][: max(0, top - 1)]
    tops = [{"token": token, "logprob": chosen, "bytes": list(token.encode())}] if top else []
    tops += [{"token": t, "logprob": lp(t, 1.0), "bytes": list(t.encode())} for t in others]
    tops.sort(key=lambda e: -float(e["logprob"]))  # type: ignore[arg-type]
    return {"token": token, "logprob": chosen, "bytes": list(token.encode()), "top_logprobs": tops}
