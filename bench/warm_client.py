"""Experiment ``warm``'s client: one conversation's turns over HTTP, each with its session
(``X-Session-Id``) and ``include_usage``, building every turn from the answer received."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

from bench.fleet import MODEL
from bench.result import ERROR, OK, TIMEOUT, Result, outcome_for_error, outcome_for_status
from bench.sse import SSEParser, read_body, read_head, request_bytes, split_url
from bench.warm_trace import Conversation


# --- the client ----------------------------------------------------------------------------
@dataclass(slots=True)
class TurnResult(Result):
    conv: int = 0
    turn: int = 0
    prompt_tokens: int = 0  # from the response's usage
    cached_tokens: int = 0
    answer: str = ""
    answer_ok: bool = True  # the answer is the one the trace expects
    affinity: dict[str, Any] | None = None


def _body(messages: list[dict[str, str]], max_tokens: int, model: str = MODEL) -> bytes:
    payload = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
    }
    return json.dumps(payload).encode()


def _parse_stream(raw: bytes) -> tuple[str, dict[str, Any] | None]:
    """The answer text and the usage object of a chat completion's SSE body."""
    text: list[str] = []
    usage = None
    for line in raw.replace(b"\r\n", b"\n").split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if not data.startswith(b"{"):
            continue
        try:
            chunk = json.loads(data)
        except ValueError:
            continue
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                text.append(content)
    return "".join(text), usage


async def one_turn(base_url: str, result: TurnResult, body: bytes, session: str) -> None:
    host, port, _ = split_url(base_url)
    reader, writer = await asyncio.open_connection(host, port)
    start = time.perf_counter()
    first: float | None = None
    raw: list[bytes] = []
    parser = SSEParser()

    def sink(data: bytes) -> bool:
        nonlocal first
        raw.append(data)
        if parser.feed(data) and first is None:
            first = time.perf_counter()
        return parser.done

    try:
        headers = {"X-Session-Id": session, "X-Priority": "normal"}
        writer.write(request_bytes("POST", host, port, "/v1/chat/completions", body, headers))
        head = await read_head(reader)
        result.status = head.status
        result.job_id = head.headers.get("x-slipstream-job-id")
        result.backend = head.headers.get("x-backend")
        if head.status != 200:
            result.outcome = outcome_for_status(head.status)
            result.error = f"HTTP {head.status}"
            return
        await read_body(reader, head, sink)
        end = time.perf_counter()
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()
    result.tokens = parser.tokens
    if first is not None:
        result.ttft_ms = (first - start) * 1000
    if parser.error is not None:
        result.outcome = outcome_for_error(parser.error)
        result.error = str(parser.error.get("code") or parser.error.get("message"))
        return
    if not (parser.done or parser.finish_reason):
        result.outcome, result.error = ERROR, "stream ended early"
        return
    result.e2e_ms = (end - start) * 1000
    result.outcome = OK
    result.answer, usage = _parse_stream(b"".join(raw))
    if usage:
        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        result.cached_tokens = int(details.get("cached_tokens") or 0)


async def run_conversation(
    base_url: str,
    conv: Conversation,
    t0: float,
    timeout_s: float,
    out: list[TurnResult],
    model: str = MODEL,
) -> None:
    """Replay one conversation: wait for its arrival, then each turn after the think time,
    built from the answer received for the one before. A turn that fails ends the
    conversation (its next turns would need the answer). Where the trace knows the answers
    (the simulator's), each is checked against them."""
    await asyncio.sleep(max(0.0, t0 + conv.at_s - time.perf_counter()))
    answers: list[str] = []
    for k in range(len(conv.users)):
        if k:
            await asyncio.sleep(conv.thinks[k])
        messages = conv.messages(k, answers)
        r = TurnResult(
            idx=conv.cid * 100 + k,
            at_s=round(time.perf_counter() - t0, 3),
            priority="normal",
            max_tokens=conv.max_tokens[k],
            deadline_ms=0,
            conv=conv.cid,
            turn=k,
        )
        r.start_s = r.at_s
        out.append(r)
        try:
            async with asyncio.timeout(timeout_s):
                body = _body(messages, conv.max_tokens[k], model)
                await one_turn(base_url, r, body, conv.session)
        except TimeoutError:
            r.outcome, r.error = TIMEOUT, f"client timeout after {timeout_s:.0f} s"
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            r.outcome, r.error = ERROR, f"{type(exc).__name__}: {exc}"[:200]
        if not r.served:
            return
        if conv.answers:
            r.answer_ok = r.answer == conv.answers[k]
        answers.append(r.answer)


async def replay(
    base_url: str, convs: list[Conversation], timeout_s: float, model: str = MODEL
) -> list[TurnResult]:
    """Every conversation, from arrivals on; the turns sorted by conversation and turn."""
    out: list[TurnResult] = []
    t0 = time.perf_counter() + 0.05
    await asyncio.gather(*(run_conversation(base_url, c, t0, timeout_s, out, model) for c in convs))
    return sorted(out, key=lambda r: (r.conv, r.turn))
