"""The asyncio load generator: one streaming OpenAI request per trace entry, timed per token.

Every arm gets the same client: a fresh HTTP/1.1 connection per request, the request body of
``/v1/completions`` with ``stream: true``, and Slipstream's ``X-Priority`` / ``X-Deadline-Ms``
headers (the other arms ignore them). Arrivals are open-loop (sent at their trace time whatever
the arm's state), so queueing shows up as latency instead of slowing the load down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.fleet import MODEL
from bench.result import ERROR, LATE, OK, TIMEOUT, Result, outcome_for_error, outcome_for_status
from bench.sse import Head, SSEParser, read_body, read_head, request_bytes, split_url
from bench.trace import TraceRequest


@dataclass(frozen=True, slots=True)
class Target:
    base_url: str
    path: str = "/v1/completions"
    model: str = MODEL
    slipstream_headers: bool = True  # X-Priority and X-Deadline-Ms

    def body(self, req: TraceRequest) -> bytes:
        payload = {
            "model": self.model,
            "prompt": req.prompt,
            "max_tokens": req.max_tokens,
            "stream": True,
            "temperature": 0,
        }
        return json.dumps(payload).encode()

    def headers(self, req: TraceRequest) -> dict[str, str]:
        if not self.slipstream_headers:
            return {}
        return {"X-Priority": req.priority, "X-Deadline-Ms": str(req.deadline_ms)}


Stamps = list[tuple[int, float]]  # (SSE id, wall-clock arrival) per token


@dataclass(slots=True)
class _Timing:
    start: float
    first: float | None = None
    last: float = 0.0


def _sink(
    result: Result, parser: SSEParser, timing: _Timing, stamps: Stamps | None
) -> Callable[[bytes], bool]:
    def feed(data: bytes) -> bool:
        now = time.perf_counter()
        seen = len(parser.ids)
        n = parser.feed(data)
        if n:
            if timing.first is None:
                timing.first = now
                result.ttft_ms = (now - timing.start) * 1000  # known while the stream runs
            else:
                result.itl_ms.append((now - timing.last) * 1000)
            result.itl_ms.extend([0.0] * (n - 1))  # tokens that arrived in the same read
            timing.last = now
            if stamps is not None:
                wall = time.time()
                stamps.extend((i, wall) for i in parser.ids[seen:])
        return parser.done

    return feed


def _finish(result: Result, parser: SSEParser, timing: _Timing, end: float) -> None:
    result.tokens = parser.tokens
    if timing.first is not None:
        result.ttft_ms = (timing.first - timing.start) * 1000
    if parser.error is not None:
        result.outcome = outcome_for_error(parser.error)
        result.error = str(parser.error.get("code") or parser.error.get("message"))
    elif parser.done or parser.finish_reason is not None:
        result.e2e_ms = (end - timing.start) * 1000
        result.outcome = OK if result.e2e_ms <= result.deadline_ms else LATE
    else:
        result.outcome = ERROR
        result.error = "stream ended early"


async def _exchange(
    target: Target, req: TraceRequest, result: Result, timing: _Timing, stamps: Stamps | None
) -> None:
    host, port, _ = split_url(target.base_url)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        body = target.body(req)
        writer.write(request_bytes("POST", host, port, target.path, body, target.headers(req)))
        head: Head = await read_head(reader)
        result.status = head.status
        result.job_id = head.headers.get("x-slipstream-job-id")
        result.backend = head.headers.get("x-backend")
        if head.status != 200:
            result.outcome = outcome_for_status(head.status)
            result.error = f"HTTP {head.status}: {await _error_text(reader, head)}"
            return
        parser = SSEParser(track_ids=stamps is not None)
        await read_body(reader, head, _sink(result, parser, timing, stamps))
        _finish(result, parser, timing, time.perf_counter())
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


async def _error_text(reader: asyncio.StreamReader, head: Head) -> str:
    parts: list[bytes] = []
    with contextlib.suppress(OSError, ConnectionError, asyncio.IncompleteReadError, ValueError):
        async with asyncio.timeout(2.0):
            await read_body(reader, head, lambda b: parts.append(b) is not None)
    raw = b"".join(parts)
    try:
        error = json.loads(raw)["error"]
        return str(error.get("code") or error.get("message"))[:120]
    except (ValueError, KeyError, TypeError, AttributeError):
        return raw[:120].decode(errors="replace")


async def one_request(
    target: Target,
    req: TraceRequest,
    t0: float,
    *,
    timeout_s: float,
    stamps: Stamps | None = None,
    result: Result | None = None,
) -> Result:
    """Send ``req`` now and follow its stream to the end (or ``timeout_s``). ``result``, when
    given, is filled in place (its job id is known even if the task is cancelled)."""
    if result is None:
        result = Result(req.idx, req.at_s, req.priority, req.max_tokens, req.deadline_ms)
    timing = _Timing(time.perf_counter())
    result.start_s = timing.start - t0
    try:
        async with asyncio.timeout(timeout_s):
            await _exchange(target, req, result, timing, stamps)
    except TimeoutError:
        result.outcome, result.error = TIMEOUT, f"client timeout after {timeout_s:.0f} s"
        result.tokens = len(result.itl_ms) + (1 if timing.first else 0)
        if timing.first is not None:
            result.ttft_ms = (timing.first - timing.start) * 1000
    except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
        result.outcome, result.error = ERROR, f"{type(exc).__name__}: {exc}"[:200]
    return result


async def run_trace(
    target: Target, trace: list[TraceRequest], *, timeout_s: float = 120.0
) -> list[Result]:
    """Open-loop replay: each request leaves at its arrival time; returns results by index."""
    t0 = time.perf_counter() + 0.05
    tasks: list[asyncio.Task[Result]] = []
    try:
        for req in trace:
            delay = t0 + req.at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(target, req, t0, timeout_s=timeout_s)))
        results = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return sorted(results, key=lambda r: r.idx)


async def run_closed(
    target: Target, trace: list[TraceRequest], *, concurrency: int = 1, timeout_s: float = 30.0
) -> list[Result]:
    """Closed-loop replay: ``concurrency`` clients, each sending its next request when the
    previous one ends (the arrival times are ignored): latency without queueing."""
    pending = list(reversed(trace))
    results: list[Result] = []
    t0 = time.perf_counter()

    async def loop() -> None:
        while pending:
            req = pending.pop()
            results.append(await one_request(target, req, t0, timeout_s=timeout_s))

    await asyncio.gather(*(loop() for _ in range(max(1, concurrency))))
    return sorted(results, key=lambda r: r.idx)
