"""A TCP proxy in front of redis-server that loses replies: the command runs, its reply never
arrives, and the client's retry (``shared/redis.py``) replays it.

Bytes go both ways unchanged. ``arm(marker)``: the next chunk a client sends that contains
``marker`` (a script's SHA, say) is forwarded to Redis; what Redis answers is read until it has
been quiet for ``quiet_s`` and swallowed, then both sides of that connection are closed. The
client sees "connection closed by server" after its command ran, exactly as when a network
blip or a failover cuts a connection between the write and the reply.

``Lost.calls()`` says what each lost reply answered: for a script call (``EVALSHA``, ``EVAL``,
``FCALL``) the script's SHA1 (or function name), else the command's name, one per command of
the chunk (a pipeline loses every reply it carried).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import dataclass


def commands(data: bytes) -> list[list[bytes]]:
    """The RESP arrays of bulk strings in ``data`` (a client's chunk), in order; parsing stops
    at anything else or at a command cut by the end of the chunk."""
    out: list[list[bytes]] = []
    pos = 0
    while data.startswith(b"*", pos):
        end = data.find(b"\r\n", pos)
        if end < 0:
            break
        count, pos, parts = int(data[pos + 1 : end]), end + 2, []
        for _ in range(count):
            end = data.find(b"\r\n", pos)
            if end < 0 or not data.startswith(b"$", pos):
                return out
            size = int(data[pos + 1 : end])
            parts.append(data[end + 2 : end + 2 + size])
            pos = end + 2 + size + 2
        if pos > len(data):
            break
        out.append(parts)
    return out


def call_name(command: list[bytes]) -> str:
    """A script call's SHA1 (``EVAL`` hashed like Redis does) or function; else the command."""
    name = command[0].upper().decode(errors="replace") if command else "?"
    if name == "EVALSHA" and len(command) > 1:
        return command[1].decode(errors="replace").lower()
    if name == "EVAL" and len(command) > 1:
        return hashlib.sha1(command[1]).hexdigest()
    if name in ("FCALL", "FCALL_RO") and len(command) > 1:
        return "fcall:" + command[1].decode(errors="replace")
    return name


@dataclass
class Lost:
    command: bytes  # the chunk that carried the marker (the command or pipeline)
    reply: bytes  # what Redis answered, never relayed

    def calls(self) -> list[str]:
        """What each command of the chunk was (``call_name``); ``MULTI``/``EXEC`` included."""
        return [call_name(c) for c in commands(self.command)]


class _Conn:
    def __init__(self) -> None:
        self.command: bytes | None = None  # set once this connection's reply is to be lost


class LossyProxy:
    def __init__(self, redis_port: int, *, quiet_s: float = 0.1) -> None:
        self.redis_port = redis_port
        self.quiet_s = quiet_s
        self.lost: list[Lost] = []
        self._marker: bytes | None = None
        self._spare = False
        self._replays: set[bytes] = set()  # lost commands whose replay is to go through
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

    def arm(self, marker: bytes, *, spare_replay: bool = False) -> None:
        """Lose the reply to the next command that contains ``marker`` (once). With
        ``spare_replay``, the first chunk equal to one whose reply was lost (the client's
        replay of it) is never the one: each lost reply is followed by a replay that goes
        through, instead of a run of losses that outlasts the client's retries."""
        self._marker = marker
        self._spare = spare_replay

    def disarm(self) -> None:
        """Lose nothing more (a loss armed and not yet taken is dropped)."""
        self._marker = None

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
            spared = data in self._replays  # a lost command sent again (``spare_replay``)
            self._replays.discard(data)
            marked = self._marker is not None and self._marker in data
            if marked and not spared and conn.command is None:
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
                if self._spare:
                    self._replays.add(conn.command)
                return
            client_w.write(data)
            await client_w.drain()
