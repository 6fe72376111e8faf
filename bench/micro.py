"""Micro-benchmarks behind docs/benchmarks.md's "Round 2" (issue 15): CPU per operation of
one piece of the first token's path, in process, where a shared machine's end-to-end noise is
larger than the piece.

    .venv/bin/python -m bench.micro logs        # one structlog line, and one below the level
    .venv/bin/python -m bench.micro sse         # one short SSE response (one frame, the last)
    .venv/bin/python -m bench.micro telemetry   # FastAPI's telemetry checks per request
    .venv/bin/python -m bench.micro redis       # a GET: redis-py's send, ours (write now)
    .venv/bin/python -m bench.micro inline      # one token relayed inline (no socket), parts
    .venv/bin/python -m bench.micro wake        # a uvloop reader woken 350, 1000, 3000 times/s

``PYTHONPATH=<another checkout>`` measures that tree's code (before/after). Each prints CPU µs
per operation (``time.process_time``), three rounds. ``redis`` starts its own redis-server on
the same CPU as this process (as in the overhead experiment, where they share one core).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

ROUNDS, N = 3, 20_000


def _cpu_us(fn: Callable[[], object], n: int = N) -> float:
    started = time.process_time()
    for _ in range(n):
        fn()
    return round((time.process_time() - started) * 1e6 / n, 1)


async def _acpu_us(fn: Callable[[], Awaitable[object]], n: int = N) -> float:
    started = time.process_time()
    for i in range(n):
        await fn()
        if i % 100 == 0:
            await asyncio.sleep(0)  # let what was cancelled finish
    return round((time.process_time() - started) * 1e6 / n, 1)


def logs() -> None:
    import structlog

    from shared.logs import configure_logging

    configure_logging("json", "info")
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the lines' destination, kept open)
    for handler in __import__("logging").getLogger().handlers:
        handler.setStream(sys.stderr)  # type: ignore[attr-defined]
    log = structlog.get_logger("slipstream.gateway")
    entry = {"model": "sim-model", "status": 200, "ttft_ms": 1.23, "tokens": 8, "outcome": "ok"}
    for _ in range(ROUNDS):
        line = _cpu_us(lambda: log.info("request_finished", job_id="abc", **entry))
        below = _cpu_us(lambda: log.debug("relay_event", job_id="abc"))
        print(f"info line {line} µs, line below the level {below} µs", file=sys.__stdout__)


async def sse() -> None:
    from gateway.multiplexer import Deadlines
    from gateway.sse import Outlet, SSEResponse, StreamCut

    deadlines, never = Deadlines(), asyncio.Event()

    async def receive() -> dict[str, Any]:
        await never.wait()  # like uvicorn's: nothing until the client goes away
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        return None

    async def one() -> None:
        cut = StreamCut()

        async def frames() -> Any:
            cut.last_frame = True
            yield b"id: 1\ndata: x\n\n"

        outlet = Outlet(cut, send_timeout_s=30.0)
        response = SSEResponse(frames(), headers={}, outlet=outlet, deadlines=deadlines)
        await response({"type": "http", "path": "/x"}, receive, send)

    await _acpu_us(one, 500)
    for _ in range(ROUNDS):
        print(f"short SSE response {await _acpu_us(one)} µs")


async def telemetry() -> None:
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def ok(request: Request) -> Response:
        return Response(b"ok")

    def app(off: bool) -> FastAPI:
        options: Any = {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
        made = FastAPI(**(options if off else {}))
        made.router.routes.append(Route("/x", ok, methods=["POST"]))
        return made

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST"}
    scope |= {"scheme": "http", "path": "/x", "raw_path": b"/x", "query_string": b""}
    scope |= {"root_path": "", "headers": [(b"host", b"x")], "client": ("127.0.0.1", 1)}
    scope |= {"server": ("127.0.0.1", 2), "state": {}}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        return None

    apps = {"default": app(False), "telemetry off": app(True)}
    for _ in range(ROUNDS):
        row = {}
        for name, made in apps.items():
            row[name] = await _acpu_us(lambda made=made: made(dict(scope), receive, send))
        print(f"request through FastAPI: {row} µs")


async def redis() -> None:
    from redis.asyncio.connection import Connection

    from shared.redis import connect

    port = 6300 + os.getpid() % 1000
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        await asyncio.sleep(0.5)
        for _ in range(ROUNDS):
            row = {}
            for name in ("redis-py", "write now"):
                client = connect(f"redis://127.0.0.1:{port}/0")  # write now (the product's)
                if name == "redis-py":
                    client.connection_pool.connection_class = Connection
                await client.set("k", "v")
                row[name] = await _acpu_us(lambda client=client: client.get("k"))
                await client.aclose()
            print(f"GET round trip, client CPU: {row} µs")
    finally:
        server.terminate()
        server.wait(10)


async def inline() -> None:
    """One single-token batch through the inline relay (``Listener.deliver`` to ``send``,
    with a ``send`` that writes nowhere), and its parts: parse, render, bookkeeping."""
    from gateway.dispatch import Dispatch
    from gateway.inline_relay import InlineRelay
    from gateway.multiplexer import Deadlines, Listener
    from gateway.openai_format import ChunkWriter
    from gateway.sse import SendGuard, StreamCut
    from shared.models import EventBatch
    from tests.helpers import make_job

    job = make_job("m")
    dispatch = Dispatch(None, None, job, worker_wait_s=1, stall_timeout_s=60, worker_ttl_s=5)  # type: ignore[arg-type]
    dispatch.events.needs_log, dispatch.started = False, True
    listener = dispatch.events.listener = Listener("c", 8, Deadlines())
    writer = ChunkWriter("completion", "cmpl-j", "m", include_usage=False)
    relay = listener.sink = InlineRelay(dispatch, writer, StreamCut(), 30.0)

    async def send(message: Any) -> None:
        return None

    task = asyncio.current_task()
    assert task is not None
    relay.send, relay.guard = send, SendGuard(Deadlines(), task, relay.cut)
    waiting = asyncio.ensure_future(listener.wait(3600))
    await asyncio.sleep(0)
    raws = [
        EventBatch.model_validate(
            {"events": [{"t": "token", "s": i, "x": " word"}], "f": 1}
        ).model_dump_json(exclude_none=True)
        for i in range(1, ROUNDS * N + 1)
    ]
    batches = iter(raws)
    events = EventBatch.model_validate_json(raws[0]).events
    for _ in range(ROUNDS):
        delivered = _cpu_us(lambda: listener.deliver(next(batches)))
        parts = {
            "parse": _cpu_us(lambda: EventBatch.model_validate_json(raws[0])),
            "render": _cpu_us(lambda: writer.frames(events)),
            "bookkeeping": _cpu_us(lambda: dispatch.note(events)),
        }
        print(f"inline delivery {delivered} µs; of which {parts}")
    assert dispatch.events.seq == ROUNDS * N  # every one went inline
    waiting.cancel()


def wake() -> None:
    """What one wake-up from idle costs a uvloop process here: a reader on the last CPU woken
    by a 100-byte write from a process on the first, at 350, 1,000 and 3,000 writes a second
    (the relay at 1,000 streams x 2 events/s is woken ~350 times a second, by strace). Its CPU
    per wake-up is nearly all the kernel's (and a VM's) cost of waking an idle CPU: the Python
    side is one read of a few bytes."""
    import socket

    cpus = sorted(os.sched_getaffinity(0))
    for hz in (350, 1000, 3000):
        mine, theirs = socket.socketpair()
        child = os.fork()
        if child == 0:
            mine.close()
            os.sched_setaffinity(0, {cpus[0]})
            _write_every(theirs, 1 / hz, until=time.monotonic() + 5)
            os._exit(0)
        theirs.close()
        os.sched_setaffinity(0, {cpus[-1]})
        started = time.process_time()
        reads = uvloop.run(_read_all(mine))
        cpu = time.process_time() - started
        os.waitpid(child, 0)
        os.sched_setaffinity(0, set(cpus))
        print(f"woken {hz}/s: {reads} wake-ups, {cpu * 1e6 / max(1, reads):.1f} µs of CPU each")


def _write_every(sock: Any, period: float, until: float) -> None:
    due = time.monotonic()
    while due < until:
        sock.send(b"x" * 100)
        due += period
        time.sleep(max(0.0, due - time.monotonic()))
    sock.close()


async def _read_all(sock: Any) -> int:
    reader, _ = await asyncio.open_connection(sock=sock)
    reads = 0
    while await reader.read(65536):
        reads += 1
    return reads


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    runs = {"sse": sse, "telemetry": telemetry, "redis": redis, "inline": inline}
    if what == "logs":
        logs()
    elif what == "wake":
        wake()
    elif what in runs:
        uvloop.run(runs[what]())
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
