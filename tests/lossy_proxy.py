"""A TCP proxy in front of redis-server that loses replies: the command runs, its reply never
arrives, and the client's retry (``shared/redis.py``) replays it.

Bytes go both ways unchanged. ``arm(marker)``: the next chunk a client sends that contains
``marker`` (a script's SHA, say) is forwarded to Redis; what Redis answers is read until it has
been quiet for ``quiet_s`` and swallowed, then both sides of that connection are closed. The
client sees "connection closed by server" after its command ran, exactly as when a network
blip or a failover cuts a connection between the write and the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass


@dataclass
class Lost:
    command: bytes  # the chunk that carried the marker (the command or pipeline)
    reply: bytes  # what Redis answered, never relayed


class _Conn:
    def __init__(self) -> None:
        self.command: bytes | None = None  # set once this connection's reply is to be lost


class LossyProxy:
    def __init__(self, redis_port: int, *, quiet_s: float = 0.1) -> None:
        self.redis_port = redis_port
        self.quiet_s = quiet_s
        self.lost: list[Lost] = []
        self._marker: bytes | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> LossyProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def arm(self, marker: bytes) -> None:
        """Lose the reply to the next command that contains ``marker`` (once)."""
        self._marker = marker

    @property
    def armed(self) -> bool:
        return self._marker is not None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.redis_port)
        except OSError:
            client_w.close()
            return
        conn = _Conn()
        pumps = [
            asyncio.create_task(self._to_redis(client_r, up_w, conn)),
            asyncio.create_task(self._to_client(up_r, client_w, conn)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._tasks.difference_update(pumps)
            for writer in (client_w, up_w):
                writer.close()

    async def _to_redis(
        self, client_r: asyncio.StreamReader, up_w: asyncio.StreamWriter, conn: _Conn
    ) -> None:
        while data := await client_r.read(65536):
            if self._marker is not None and self._marker in data and conn.command is None:
                self._marker = None
                conn.command = data
            up_w.write(data)
            await up_w.drain()

    async def _to_client(
        self, up_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, conn: _Conn
    ) -> None:
        while data := await up_r.read(65536):
            if conn.command is not None:  # Redis ran it: swallow the whole answer, then cut
                reply = data
                while True:
                    try:
                        async with asyncio.timeout(self.quiet_s):
                            more = await up_r.read(65536)
                    except TimeoutError:
                        break
                    if not more:
                        break
                    reply += more
                self.lost.append(Lost(conn.command, reply))
                return
            client_w.write(data)
            await client_w.drain()
