"""Fuzzing: schemathesis against the gateway's own OpenAPI schema, hypothesis on the request
models. No answer may be a server error, and no refused request may leave a job in Redis.

The gateway and a fast simulated worker run as processes, so valid requests really run. Valid
(``positive``) cases get ``model`` set to the served model so they reach admission and the
queue; ``negative`` cases are left as generated. A 504 ``deadline_exceeded`` is allowed: a
fuzzed deadline of a few milliseconds can pass while the job runs, and saying so is correct.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis as sync_redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from gateway.intake import build_job, parse
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.settings import GatewaySettings
from shared.errors import SlipstreamError
from tests.helpers import RedisProcess, free_port, wait_for_port

EXAMPLES = 60  # per operation and mode: about 800 requests in all, under a minute
MODEL = "sim-model"


def spawn(*args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "slipstream", *args]
    return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def served(redis_server: RedisProcess) -> Iterator[str]:
    """A gateway process and a fast sim worker process on a clean database."""
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    port = free_port()
    env = {
        "REDIS_URL": redis_server.url,
        "SLIPSTREAM_LOG_LEVEL": "error",
        "SLIPSTREAM_MODELS": MODEL,
        "SLIPSTREAM_MAX_TOKENS_CAP": "64",
        "SLIPSTREAM_WORKER_WAIT_S": "2",
    }
    gateway = spawn("gateway", "--port", str(port), env=env)
    worker = spawn(
        "worker", "--model", MODEL, "--sim-tokens-per-s", "5000", "--sim-ttft-ms", "1", env=env
    )
    try:
        wait_for_port(port, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        for proc in (worker, gateway):
            proc.terminate()
            proc.wait(15)


def job_count(client: sync_redis.Redis) -> int:
    return sum(1 for _ in client.scan_iter(match="slip:jobidx:*", count=1000))


def run_operation(
    operation: Any, mode: GenerationMode, base: str, client: sync_redis.Redis, tally: Counter[str]
) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def test(case: Any) -> None:
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL
        before = job_count(client)
        response = case.call(base_url=base, timeout=10)
        tally[f"{response.status_code // 100}xx"] += 1
        if response.status_code >= 400:
            code = response.json().get("error", {}).get("code")
            tally[f"{case.method} {case.path} {mode.value} {response.status_code} {code}"] += 1
        else:
            tally[f"{case.method} {case.path} {mode.value} {response.status_code}"] += 1
        detail = f"{case.method} {case.path} {case.body!r:.300} -> {response.text[:300]}"
        if response.status_code == 504:
            assert response.json()["error"]["code"] == "deadline_exceeded", detail
            tally["504"] += 1
        else:
            assert response.status_code < 500, detail
        assert "Traceback" not in response.text
        if 400 <= response.status_code < 500:  # refused: must not have been queued
            assert job_count(client) == before, f"a refused request left a job: {detail}"

    try:
        test()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise  # an operation without parameters has no invalid form: nothing to send


def test_schemathesis_finds_no_server_error(served: str, redis_server: RedisProcess) -> None:
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json")
    client = sync_redis.Redis.from_url(redis_server.url)
    tally: Counter[str] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    bodies = [op for op in operations if op.method.upper() == "POST" and op.body]
    assert {op.path for op in bodies} >= {"/v1/chat/completions", "/v1/completions"}
    try:
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                run_operation(operation, mode, served, client, tally)
    finally:
        client.close()
    print("schemathesis:", json.dumps(dict(sorted(tally.items())), indent=1))
    assert tally["2xx"] > 0 and tally["4xx"] > 0  # both valid and refused requests ran
    assert tally["5xx"] == tally.get("504", 0)


# --- hypothesis on the request models ---------------------------------------------------------

SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "stop", "seed", "n", "stream", "stream_options", "priority", "deadline_ms", "user",
]  # fmt: skip


class FakeRequest:
    """What ``build_job`` reads from a request: headers."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers


@settings(max_examples=300, deadline=None, database=None)
@given(
    body=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=8),
    chat=st.booleans(),
    headers=st.dictionaries(
        st.sampled_from(["x-priority", "x-deadline-ms", "x-request-id"]), st.text(max_size=12)
    ),
)
def test_any_body_is_a_job_or_a_client_error(
    body: dict[str, Any], chat: bool, headers: dict[str, str]
) -> None:
    model = ChatCompletionRequest if chat else CompletionRequest
    try:
        parsed = parse(model, body)
        job = build_job(FakeRequest(headers), parsed, GatewaySettings())  # type: ignore[arg-type]
    except SlipstreamError as exc:
        assert 400 <= exc.status < 500 and exc.message
        json.dumps(exc.envelope())  # the envelope always serializes
        return
    assert job.params.max_tokens >= 1 and job.prompt_tokens_estimate >= 1
    assert math.isfinite(job.params.temperature) and 0 <= job.params.temperature <= 2
    assert job.deadline_at_ms is not None and job.deadline_at_ms > job.enqueued_at_ms


MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=50)}
)


@settings(max_examples=200, deadline=None, database=None)
@given(
    messages=st.lists(MESSAGE, min_size=1, max_size=5),
    max_tokens=st.integers(1, 4096),
    temperature=st.floats(0, 2),
    stop=st.lists(st.text(min_size=1, max_size=8), max_size=4),
    priority=st.sampled_from(["high", "normal", "low"]),
    deadline_ms=st.integers(1, 86_400_000),
)
def test_every_valid_chat_body_is_accepted(
    messages: list[dict[str, str]],
    max_tokens: int,
    temperature: float,
    stop: list[str],
    priority: str,
    deadline_ms: int,
) -> None:
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stop": stop,
        "priority": priority,
        "deadline_ms": deadline_ms,
    }
    job = build_job(FakeRequest({}), parse(ChatCompletionRequest, body), GatewaySettings())  # type: ignore[arg-type]
    assert job.params.max_tokens == max_tokens and job.params.stop == stop
    assert job.priority.value == priority
    assert job.deadline_at_ms == job.enqueued_at_ms + deadline_ms
    assert job.messages is not None and [m.content for m in job.messages] == [
        m["content"] for m in messages
    ]
