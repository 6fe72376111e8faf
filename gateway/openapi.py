"""Request-body schemas for the OpenAPI document of routes that read the raw body themselves.

The generation routes parse bodies by hand (size cap, UTF-8, NUL bytes before JSON), so
FastAPI cannot see their models; ``json_body`` writes them into the route's ``openapi_extra``
with every ``$ref`` inlined, so clients and fuzzers (schemathesis) see the real contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from starlette.routing import BaseRoute

from gateway.settings import GatewaySettings


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` substituted in place (they do not nest)."""
    schema = model.model_json_schema()
    result: dict[str, Any] = _inline(schema, schema.get("$defs", {}))
    return result


def json_body(*models: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body is one of ``models``."""
    schemas = [inline_schema(m) for m in models]
    schema = schemas[0] if len(schemas) == 1 else {"oneOf": schemas}
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    }


def _limit(body: dict[str, Any], settings: GatewaySettings) -> None:
    """Write the gateway's configured limits into one request-body schema."""
    props = body.get("properties", {})
    for name in ("max_tokens", "max_completion_tokens"):
        for option in props.get(name, {}).get("anyOf", []):
            if option.get("type") == "integer":
                option["maximum"] = settings.max_tokens_cap
    for option in props.get("stop", {}).get("anyOf", []):
        if option.get("type") == "string":
            option["maxLength"] = settings.max_stop_chars
        elif option.get("type") == "array":
            option["maxItems"] = settings.max_stop
            option["items"] = {"type": "string", "maxLength": settings.max_stop_chars}
    if "messages" in props:
        props["messages"]["maxItems"] = settings.max_messages


def document(app: FastAPI, settings: GatewaySettings, unmounted: Sequence[BaseRoute]) -> None:
    """Make ``/openapi.json`` describe the routes FastAPI does not see (``unmounted``: API
    routes that only document plain Starlette routes) and state this gateway's limits
    (max_tokens cap, stop sequences, message count), so the documented contract is the
    enforced one."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        extra = get_openapi(title=app.title, version=app.version, routes=list(unmounted))
        schema["paths"] = {**extra["paths"], **schema.get("paths", {})}
        for path in schema["paths"].values():
            body = path.get("post", {}).get("requestBody", {})
            found = body.get("content", {}).get("application/json", {}).get("schema", {})
            for option in found.get("oneOf", [found]):
                _limit(option, settings)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
