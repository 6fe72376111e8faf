"""From an HTTP request to a validated ``Job``: size cap, UTF-8, JSON, schema, extensions.

Everything here runs before anything touches Redis, so a rejected request leaves no trace.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.settings import GatewaySettings
from shared.affinity import session_key
from shared.errors import InvalidRequest, PayloadTooLarge
from shared.models import ChatMessage, Job, Priority, SamplingParams

Body = TypeVar("Body", bound=BaseModel)
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
SURROGATE = re.compile("[\ud800-\udfff]")


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 past ``limit`` bytes (checked before and while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"request body is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise InvalidRequest("request body is empty; send a JSON object")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
        if not isinstance(data, dict):
            raise InvalidRequest("request body must be a JSON object")
        if "\\u" in text:  # only an escape makes a NUL or a lone surrogate (raw ones are
            _reject_nul(data, "")  # refused by the parser, or by the UTF-8 decoding)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc.msg} at {exc.pos}") from None
    except ValueError as exc:  # an integer past Python's limit on digits (4,300)
        raise InvalidRequest(f"request body has a number that is too long: {exc}") from None
    except RecursionError:  # ``[`` x 100,000: the parser or the walker ran out of stack
        raise InvalidRequest("request body is nested too deeply") from None
    return data


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"{name} is not a valid JSON number")


def _reject_nul(value: Any, path: str) -> None:
    """NUL characters and unpaired surrogates (``"\\ud800"``: valid JSON, not Unicode text)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidRequest("strings must not contain NUL characters", param=path or None)
        if SURROGATE.search(value):
            raise InvalidRequest(
                "strings must not contain unpaired UTF-16 surrogates", param=path or None
            )
    elif isinstance(value, dict):
        for k, v in value.items():
            _reject_nul(k, path)
            _reject_nul(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _reject_nul(v, f"{path}[{i}]")


def parse(model: type[Body], data: Any) -> Body:
    """Validate against ``model``; the first problem becomes a 400 naming its parameter."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            message = f"unsupported parameter: {param}"
        elif err["type"] == "literal_error" and param == "n":
            message = "only n=1 is supported"
        else:
            message = f"invalid value for {param}: {err['msg']}"
        raise InvalidRequest(message, param=param) from None


def estimate_tokens(text: str) -> int:
    """Conservative prompt estimate for capacity (about four characters a token)."""
    return max(1, (len(text) + 3) // 4)


def _priority(request: Request, body: Priority | None) -> Priority:
    header = request.headers.get("x-priority")
    if header is None:
        return body or Priority.NORMAL
    try:
        return Priority(header.strip().lower())
    except ValueError:
        raise InvalidRequest(
            "X-Priority must be one of high, normal, low", param="X-Priority"
        ) from None


def _deadline_ms(request: Request, body: int | None) -> int | None:
    header = request.headers.get("x-deadline-ms")
    if header is None:
        return body
    try:
        value = int(header)
    except ValueError:
        raise InvalidRequest("X-Deadline-Ms must be an integer", param="X-Deadline-Ms") from None
    if not 1 <= value <= 86_400_000:
        raise InvalidRequest(
            "X-Deadline-Ms must be between 1 and 86400000 (a time budget)", param="X-Deadline-Ms"
        )
    return value


def _session(request: Request, body: ChatCompletionRequest | CompletionRequest) -> str | None:
    """The conversation a request belongs to: ``X-Session-Id``, else ``prompt_cache_key``,
    else ``user`` (what OpenAI's own prompt caching keys on); None when there is none."""
    header = request.headers.get("x-session-id")
    if header is not None and not (0 < len(header) <= 256):
        raise InvalidRequest("X-Session-Id must be 1 to 256 characters", param="X-Session-Id")
    return header or body.prompt_cache_key or body.user


def request_id(request: Request) -> str:
    given = request.headers.get("x-request-id")
    if given and REQUEST_ID.match(given):
        return given
    return uuid.uuid4().hex


def build_job(
    request: Request,
    body: ChatCompletionRequest | CompletionRequest,
    settings: GatewaySettings,
    *,
    tenant: str = "anonymous",
    now_ms: int | None = None,
) -> Job:
    """The job for a validated body, checked against the gateway's limits.

    ``now_ms`` is Redis's time (the scripts judge ``deadline_at_ms`` by it, so a gateway
    whose clock is off does not shorten or stretch deadlines); the host's clock without it.
    """
    max_tokens, stops = _output_limits(body, settings)
    kind, messages, prompt, prompt_tokens = _prompt_of(body, settings)
    deadline = _deadline_ms(request, body.deadline_ms)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    budget = deadline if deadline is not None else int(settings.request_timeout_s * 1000)
    return Job(
        id=uuid.uuid4().hex,
        model=body.model,
        kind=kind,
        messages=messages,
        prompt=prompt,
        params=SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=stops,
        ),
        priority=_priority(request, body.priority),
        enqueued_at_ms=now,
        deadline_at_ms=now + budget,
        prompt_tokens_estimate=prompt_tokens,
        request_id=request_id(request),
        tenant=tenant,
        session=session_key(tenant, sid) if (sid := _session(request, body)) else None,
        features=body.features(),  # parsed once; admission checks a live worker has them
    )


def _output_limits(
    body: ChatCompletionRequest | CompletionRequest, settings: GatewaySettings
) -> tuple[int, list[str]]:
    """The output budget and stop sequences, checked against the gateway's limits."""
    max_tokens = body.output_budget() or min(settings.default_max_tokens, settings.max_tokens_cap)
    if max_tokens > settings.max_tokens_cap:
        raise InvalidRequest(
            f"max_tokens must be at most {settings.max_tokens_cap}", param="max_tokens"
        )
    stops = body.stops()
    if len(stops) > settings.max_stop or any(len(s) > settings.max_stop_chars for s in stops):
        raise InvalidRequest(
            f"at most {settings.max_stop} stop sequences of at most "
            f"{settings.max_stop_chars} characters",
            param="stop",
        )
    return max_tokens, stops


def _prompt_of(
    body: ChatCompletionRequest | CompletionRequest, settings: GatewaySettings
) -> tuple[Literal["chat", "completion"], list[ChatMessage] | None, str | None, int]:
    """(kind, messages, prompt, estimated prompt tokens), checked against the limits."""
    if isinstance(body, ChatCompletionRequest):
        if len(body.messages) > settings.max_messages:
            raise InvalidRequest(f"at most {settings.max_messages} messages", param="messages")
        messages = [m.to_message() for m in body.messages]
        text = "\n".join(m.content for m in messages)
    else:
        messages, text = None, body.prompt
    prompt_tokens = estimate_tokens(text) + (4 * len(messages) if messages else 0)
    if prompt_tokens > settings.max_prompt_tokens:
        raise InvalidRequest(
            f"prompt is about {prompt_tokens} tokens; the limit is {settings.max_prompt_tokens}",
            param="messages" if messages else "prompt",
            code="context_length_exceeded",
        )
    if messages is None:
        return "completion", None, text, prompt_tokens
    return "chat", messages, None, prompt_tokens
