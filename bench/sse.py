"""Raw HTTP/1.1 over asyncio streams and an incremental SSE parser (one token per event).

No HTTP library and no tokenizer: every arm is read by the same few lines of code, and a token
is an SSE ``data:`` event whose chunk says ``"finish_reason": null``. The parser never decodes
JSON on the token path, so the load generator stays cheap at tens of thousands of events/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

READ_SIZE = 65536
MAX_HEAD = 65536


@dataclass(slots=True)
class Head:
    status: int
    headers: dict[str, str]

    @property
    def chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()

    @property
    def length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value and value.isdigit() else None


def split_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"


def request_bytes(
    method: str, host: str, port: int, path: str, body: bytes, headers: dict[str, str]
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_head(reader: asyncio.StreamReader) -> Head:
    raw = await reader.readuntil(b"\r\n\r\n")
    if len(raw) > MAX_HEAD:
        raise ValueError("response head too large")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Head(status, headers)


class Dechunker:
    """Incremental ``Transfer-Encoding: chunked`` decoder (feed bytes, get payload bytes)."""

    __slots__ = ("buf", "done", "need")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = -1  # -1: reading a size line
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = bytearray()
        while not self.done:
            if self.need < 0:
                end = self.buf.find(b"\r\n")
                if end < 0:
                    break
                size = int(bytes(self.buf[:end]).split(b";", 1)[0], 16)
                del self.buf[: end + 2]
                if size == 0:
                    self.done = True
                    break
                self.need = size
            elif len(self.buf) >= self.need + 2:
                out += self.buf[: self.need]
                del self.buf[: self.need + 2]
                self.need = -1
            else:
                break
        return bytes(out)


async def read_body(
    reader: asyncio.StreamReader, head: Head, sink: Callable[[bytes], bool]
) -> None:
    """Feed the body to ``sink`` as it arrives; stop at its end or when ``sink`` returns True."""
    dechunker = Dechunker() if head.chunked else None
    left = head.length
    while left is None or left > 0:
        data = await reader.read(READ_SIZE)
        if not data:
            return
        if dechunker is not None:
            data = dechunker.feed(data)
        elif left is not None:
            left -= len(data)
        if sink(data) or (dechunker is not None and dechunker.done):
            return


@dataclass(slots=True)
class SSEParser:
    """Splits the SSE byte stream into events and classifies them.

    ``feed`` returns how many token events the data completed. With ``track_ids`` the ``id:`` of
    every token event is kept (for delivery latency against the job's event log).
    """

    track_ids: bool = False
    buf: bytes = b""
    tokens: int = 0
    pings: int = 0
    done: bool = False
    finish_reason: str | None = None
    error: dict[str, Any] | None = None
    ids: list[int] = field(default_factory=list)

    def feed(self, data: bytes) -> int:
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        self.buf += data
        if b"\n\n" not in self.buf:
            return 0
        *blocks, self.buf = self.buf.split(b"\n\n")
        before = self.tokens
        for block in blocks:
            self._event(block)
        return self.tokens - before

    def _event(self, block: bytes) -> None:
        data = b""
        event_id = -1
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                data = line[5:].lstrip()
            elif line.startswith(b"id:"):
                with contextlib.suppress(ValueError):
                    event_id = int(line[3:])
            elif line.startswith(b":"):
                self.pings += 1
        if not data:
            return
        if b'"finish_reason":null' in data or b'"finish_reason": null' in data:
            self.tokens += 1
            if self.track_ids:
                self.ids.append(event_id)
        elif data == b"[DONE]":
            self.done = True
        elif data.startswith(b'{"error"'):
            self.error = _error_of(data)
            self.done = True
        elif b'"finish_reason"' in data:
            self.finish_reason = _finish_of(data)


def _error_of(data: bytes) -> dict[str, Any]:
    try:
        error = json.loads(data)["error"]
        return error if isinstance(error, dict) else {"message": str(error)}
    except (ValueError, KeyError, TypeError):
        return {"message": data[:200].decode(errors="replace")}


def _finish_of(data: bytes) -> str | None:
    try:
        choices = json.loads(data).get("choices") or [{}]
        reason = choices[0].get("finish_reason")
        return str(reason) if reason is not None else None
    except (ValueError, AttributeError, IndexError):
        return None


async def http_json(
    url: str, *, method: str = "GET", payload: Any = None, timeout: float = 5.0
) -> tuple[int, Any]:
    """One small request (readiness checks, probes); returns status and decoded JSON or None."""
    host, port, path = split_url(url)
    body = b"" if payload is None else json.dumps(payload).encode()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(request_bytes(method, host, port, path, body, {}))
        head = await asyncio.wait_for(read_head(reader), timeout)
        parts: list[bytes] = []
        await asyncio.wait_for(
            read_body(reader, head, lambda b: parts.append(b) is not None), timeout
        )
        raw = b"".join(parts)
        try:
            return head.status, json.loads(raw) if raw else None
        except ValueError:
            return head.status, None
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()
