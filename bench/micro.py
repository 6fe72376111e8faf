"""Micro-benchmarks behind docs/benchmarks.md's "Round 2" (issue 15): CPU per operation of
one piece of the first token's path, in process, where a shared machine's end-to-end noise is
larger than the piece.

    .venv/bin/python -m bench.micro logs        # one structlog line, and one below the level
    .venv/bin/python -m bench.micro sse         # one short SSE response (one frame, the last)
    .venv/bin/python -m bench.micro telemetry   # FastAPI's telemetry checks per request
    .venv/bin/python -m bench.micro redis       # a GET: redis-py's send and pool, ours
    .venv/bin/python -m bench.micro inline      # one token relayed inline (no socket), parts
    .venv/bin/python -m bench.micro wake        # a uvloop reader woken 350, 1000, 3000 times/s
    .venv/bin/python -m bench.micro enqueue     # an ENQUEUE's client CPU: redis-py's packer, ours
    .venv/bin/python -m bench.micro scripts     # Redis's own µs per ENQUEUE, PULL, EMIT (SLOWLOG)

``PYTHONPATH=<another checkout>`` measures that tree's code (before/after). Each prints CPU µs
per operation (``time.process_time``), three rounds. ``redis`` starts its own redis-server on
the same CPU as this process (as in the overhead experiment, where they share one core).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
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


@contextlib.contextmanager
def _redis_server() -> Iterator[str]:
    """A redis-server of its own for one micro-benchmark (the tests' ``start_redis``: a free
    port, ready when it answers); yields its URL."""
    from tests.helpers import start_redis

    server = start_redis()
    try:
        yield server.url
    finally:
        server.stop()


async def redis() -> None:
    """A GET's client CPU: redis-py's connection and pool; our connection (write now) in
    redis-py's pool; both of ours (the product: ``shared/redis_connection.py``,
    ``shared/redis_pool.py``)."""
    from redis.asyncio import BlockingConnectionPool
    from redis.asyncio.connection import Connection

    from shared.redis import connect

    with _redis_server() as url:
        for _ in range(ROUNDS):
            row = {}
            for name in ("redis-py", "write now", "write now + ready pool"):
                client = connect(url)  # the product's
                if name == "redis-py":
                    client.connection_pool.connection_class = Connection
                if name != "write now + ready pool":
                    client.connection_pool.__class__ = BlockingConnectionPool
                await client.set("k", "v")
                row[name] = await _acpu_us(lambda client=client: client.get("k"))
                await client.aclose()
            print(f"GET round trip, client CPU: {row} µs")


async def enqueue() -> None:
    """One ``ENQUEUE`` (the job-index ``SET`` and the script, one pipeline), client CPU, with
    redis-py's Python packer and with the product's (hiredis's)."""
    from redis.asyncio.connection import AbstractConnection

    from shared.jobs import JobStore
    from shared.keys import Keys
    from shared.redis import connect
    from shared.redis_connection import WriteNowConnection
    from tests.helpers import make_job

    class PythonPacked(WriteNowConnection):
        pack_command = AbstractConnection.pack_command

    with _redis_server() as url:
        for _ in range(ROUNDS):
            row = {}
            for name, cls in (("redis-py packer", PythonPacked), ("hiredis", WriteNowConnection)):
                client = connect(url)
                client.connection_pool.connection_class = cls
                store = JobStore(client, Keys(), ttl_s=600)
                jobs = iter([make_job() for _ in range(2_000)])
                row[name] = await _acpu_us(lambda s=store, j=jobs: s.enqueue(next(j)), 2_000)
                await client.aclose()
            print(f"ENQUEUE, client CPU: {row} µs")


async def scripts() -> None:
    """Redis's own time per ``ENQUEUE``, ``PULL`` and ``EMIT`` (its ``SLOWLOG``, every call
    logged) over 1,000 jobs queued, pulled and finished one at a time, after 100 unlogged."""
    import statistics
    import uuid

    from shared import scripts as lua
    from shared.jobs import JobStore
    from shared.keys import Keys
    from shared.models import DoneEvent, EventBatch, JobState, Usage
    from shared.redis import connect
    from tests.helpers import make_job

    names = {s.sha: n for n, s in vars(lua).items() if isinstance(getattr(s, "sha", None), str)}
    with _redis_server() as url:
        client = connect(url)
        store = JobStore(client, Keys(), ttl_s=600)
        for i in range(1_100):
            if i == 100:
                await client.config_set("slowlog-log-slower-than", 0)
                await client.config_set("slowlog-max-len", 100_000)
                await client.slowlog_reset()
            await store.enqueue(make_job())
            got = await store.pull(
                "sim-model", "w1", free_tokens=100_000, idle=True, lease_ms=30_000,
                aging_ms={}, max_deliveries=5, pull_id=uuid.uuid4().hex,
            )  # fmt: skip
            c = got.claimed
            assert c is not None, got
            usage = Usage(prompt_tokens=1, completion_tokens=0)
            end = DoneEvent(s=c.seq + 1, finish_reason="stop", usage=usage)
            batch = EventBatch(f=c.fence, events=[end])
            await store.emit(c, batch, new_tokens=0, terminal=JobState.COMPLETED)
        times: dict[str, list[int]] = {}
        for entry in await client.slowlog_get(100_000):
            raw = entry["command"]
            command = (raw.decode() if isinstance(raw, bytes) else str(raw)).split()
            if command[0].upper() == "EVALSHA" and command[1] in names:
                times.setdefault(names[command[1]], []).append(int(entry["duration"]))
        await client.aclose()
    row = {name: statistics.median(us) for name, us in sorted(times.items())}
    print(f"Redis µs per call, median of {len(times.get('PULL', []))}: {row}")


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
    runs = {
        "sse": sse,
        "telemetry": telemetry,
        "redis": redis,
        "inline": inline,
        "enqueue": enqueue,
        "scripts": scripts,
    }
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
