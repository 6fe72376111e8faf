"""Bad input gets a 4xx in the OpenAI envelope and leaves no trace in the queues."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from shared.keys import Keys
from shared.models import Priority
from tests.helpers import gateway_settings, running_gateway

MSG = [{"role": "user", "content": "hi"}]
CHAT_CASES: list[tuple[str, Any, int, str | None]] = [
    ("malformed json", b'{"model": "sim-model", "messages": [', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("empty body", b"", 400, None),
    ("non utf-8", b'{"model": "sim-model\xff"}', 400, None),
    ("nan temperature", b'{"model":"sim-model","messages":[],"temperature":NaN}', 400, None),
    ("wrong type", {"model": "sim-model", "messages": "hi"}, 400, "messages"),
    ("unknown model", {"model": "nope", "messages": MSG}, 404, "model"),
    ("n=2", {"model": "sim-model", "messages": MSG, "n": 2}, 400, "n"),
    (
        "negative max_tokens",
        {"model": "sim-model", "messages": MSG, "max_tokens": -1},
        400,
        "max_tokens",
    ),
    (
        "huge max_tokens",
        {"model": "sim-model", "messages": MSG, "max_tokens": 10**6},
        400,
        "max_tokens",
    ),
    ("unsupported field", {"model": "sim-model", "messages": MSG, "tools": []}, 400, "tools"),
    (
        "penalty",
        {"model": "sim-model", "messages": MSG, "presence_penalty": 1.0},
        400,
        "presence_penalty",
    ),
    (
        "bad priority",
        {"model": "sim-model", "messages": MSG, "priority": "urgent"},
        400,
        "priority",
    ),
    (
        "negative deadline",
        {"model": "sim-model", "messages": MSG, "deadline_ms": -5},
        400,
        "deadline_ms",
    ),
    (
        "nul byte",
        {"model": "sim-model", "messages": [{"role": "user", "content": "a\u0000"}]},
        400,
        "messages[0].content",
    ),
    ("no messages", {"model": "sim-model", "messages": []}, 400, "messages"),
    (
        "too many stops",
        {"model": "sim-model", "messages": MSG, "stop": list("abcdef")},
        400,
        "stop",
    ),
    (
        "string as temperature",
        {"model": "sim-model", "messages": MSG, "temperature": "1"},
        400,
        "temperature",
    ),
]


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        running_gateway(gateway_settings(redis_url, max_body_bytes=4096)) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as http,
    ):
        yield http


async def queued(redis: Redis) -> int:
    return sum([await redis.xlen(Keys().queue("sim-model", p)) for p in Priority.ordered()])


@pytest.mark.parametrize(
    ("name", "body", "status", "param"), CHAT_CASES, ids=[c[0] for c in CHAT_CASES]
)
async def test_bad_chat_request(
    client: httpx.AsyncClient, redis: Redis, name: str, body: Any, status: int, param: str | None
) -> None:
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = await client.post(
        "/v1/chat/completions", headers={"Content-Type": "application/json"}, **kwargs
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    assert "Traceback" not in response.text
    assert await queued(redis) == 0


@pytest.mark.parametrize(
    ("headers", "param"),
    [
        ({"X-Priority": "urgent"}, "X-Priority"),
        ({"X-Deadline-Ms": "-1"}, "X-Deadline-Ms"),
        ({"X-Deadline-Ms": "soon"}, "X-Deadline-Ms"),
    ],
)
async def test_bad_extension_headers(
    client: httpx.AsyncClient, redis: Redis, headers: dict[str, str], param: str
) -> None:
    response = await client.post(
        "/v1/chat/completions", json={"model": "sim-model", "messages": MSG}, headers=headers
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert await queued(redis) == 0


async def test_body_too_large_is_413(client: httpx.AsyncClient, redis: Redis) -> None:
    big = {"model": "sim-model", "messages": [{"role": "user", "content": "x" * 10_000}]}
    response = await client.post("/v1/chat/completions", json=big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert await queued(redis) == 0


async def test_unknown_route_is_enveloped_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


async def test_health_and_ready(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200


BAD = "invalid_request"
TIGHT_CASES: list[tuple[str, Any, int, str | None, str]] = [
    ("unpaired surrogate", b'{"model":"sim-model","prompt":"\\ud83a"}', 400, "prompt", BAD),
    ("deadline zero", {"prompt": "hi", "deadline_ms": 0}, 400, "deadline_ms", "invalid_request"),
    ("deadline float", {"prompt": "hi", "deadline_ms": 1.5}, 400, "deadline_ms", "invalid_request"),
    ("bool max_tokens", {"prompt": "hi", "max_tokens": True}, 400, "max_tokens", "invalid_request"),
    ("float seed", {"prompt": "hi", "seed": 1.5}, 400, "seed", "invalid_request"),
    ("huge seed", {"prompt": "hi", "seed": 2**70}, 400, "seed", "invalid_request"),
    ("stop too long", {"prompt": "hi", "stop": "abcdefgh"}, 400, "stop", "invalid_request"),
    ("prompt not text", {"prompt": ["a", "b"]}, 400, "prompt", "invalid_request"),
    ("priority number", {"prompt": "hi", "priority": 1}, 400, "priority", "invalid_request"),
    ("infinity", b'{"model":"sim-model","prompt":"x","top_p":Infinity}', 400, None, BAD),
    (
        "prompt too long",
        {"prompt": "x" * 400},
        400,
        "prompt",
        "context_length_exceeded",
    ),
]  # fmt: skip
TIGHT_CHAT_CASES: list[tuple[str, Any, int, str | None, str]] = [
    ("too many messages", {"messages": MSG * 4}, 400, "messages", "invalid_request"),
    (
        "completion tokens over cap",
        {"messages": MSG, "max_completion_tokens": 65},
        400,
        "max_tokens",
        "invalid_request",
    ),
    ("content not text", {"messages": [{"role": "user", "content": 5}]}, 400, None, BAD),
    ("tool role", {"messages": [{"role": "tool", "content": "x"}]}, 400, None, "invalid_request"),
]  # fmt: skip


@pytest.fixture
async def tight(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway with small limits, so each limit is reachable under the body cap."""
    settings = gateway_settings(
        redis_url, max_messages=3, max_prompt_tokens=50, max_stop_chars=5, max_tokens_cap=64
    )
    async with running_gateway(settings) as base, httpx.AsyncClient(base_url=base) as http:
        yield http


async def check_refused(
    response: httpx.Response, redis: Redis, status: int, param: str | None, code: str
) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    if param is not None:
        assert error["param"] == param
    assert "Traceback" not in response.text
    assert await queued(redis) == 0


@pytest.mark.parametrize(
    ("name", "body", "status", "param", "code"), TIGHT_CASES, ids=[c[0] for c in TIGHT_CASES]
)
async def test_bad_completion_request(
    tight: httpx.AsyncClient,
    redis: Redis,
    name: str,
    body: Any,
    status: int,
    param: str | None,
    code: str,
) -> None:
    kwargs: dict[str, Any] = (
        {"content": body} if isinstance(body, bytes) else {"json": {"model": "sim-model", **body}}
    )
    response = await tight.post("/v1/completions", **kwargs)
    await check_refused(response, redis, status, param, code)


@pytest.mark.parametrize(
    ("name", "body", "status", "param", "code"),
    TIGHT_CHAT_CASES,
    ids=[c[0] for c in TIGHT_CHAT_CASES],
)
async def test_bad_chat_request_against_limits(
    tight: httpx.AsyncClient,
    redis: Redis,
    name: str,
    body: Any,
    status: int,
    param: str | None,
    code: str,
) -> None:
    response = await tight.post("/v1/chat/completions", json={"model": "sim-model", **body})
    await check_refused(response, redis, status, param, code)


@pytest.mark.parametrize(
    ("headers", "param"),
    [
        ({"X-Deadline-Ms": "0"}, "X-Deadline-Ms"),
        ({"X-Priority": ""}, "X-Priority"),
        ({"X-Cancel-On-Disconnect": "maybe"}, "X-Cancel-On-Disconnect"),
        ({"Idempotency-Key": "k" * 300}, "Idempotency-Key"),
    ],
)
async def test_more_bad_headers(
    tight: httpx.AsyncClient, redis: Redis, headers: dict[str, str], param: str
) -> None:
    response = await tight.post(
        "/v1/completions", json={"model": "sim-model", "prompt": "hi"}, headers=headers
    )
    await check_refused(response, redis, 400, param, "invalid_request")


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


DEEP_BODIES = {
    "unclosed": b"[" * 100_000,
    "balanced": nested(100_000),
    "in a field": b'{"model":"sim-model","messages":' + nested(100_000) + b"}",
    "just parses": b'{"model":"sim-model","messages":[{"role":"user","content":"hi"}],"x":'
    + nested(900)
    + b"}",
    "in messages": b'{"model":"sim-model","messages":' + nested(900) + b"}",
    # not nested, but refused by the parser in its own way too: an integer past Python's limit
    # of 4,300 digits raises a plain ValueError, not a JSONDecodeError
    "a number of 5,000 digits": b'{"model":"sim-model","max_tokens":' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("body", DEEP_BODIES.values(), ids=list(DEEP_BODIES))
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/jobs"])
async def test_deeply_nested_json_is_400(
    redis_url: str, redis: Redis, path: str, body: bytes
) -> None:
    settings = gateway_settings(redis_url, max_body_bytes=1 << 20)
    async with (
        running_gateway(settings) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as http,
    ):
        response = await http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert await queued(redis) == 0
