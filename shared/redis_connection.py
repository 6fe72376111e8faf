"""Connections that write a command at once when the socket can take it.

redis-py 5's asyncio ``send_packed_command`` wraps every write in ``asyncio.wait_for`` when a
socket timeout is set (ours always is), and ``wait_for`` makes a Task for each: a fifth of
the gateway's CPU at 10,000 streams went to that Task (py-spy), on writes that had already
left, since ``drain()`` only waits while the transport's buffer is above its high-water mark.

``send_packed_command`` here writes at once when the connection is up, no health check is due
and the transport's buffer is empty (so ``drain()`` would return at once); every other case,
redis-py's own path, timeout included. No wait is left without a timeout: bytes a server
does not read stay in the buffer, the next command takes redis-py's path (its ``drain()``
under ``wait_for``), and the reply's read has its own timeout. A failed write disconnects and
raises ``ConnectionError``, as redis-py's does, so the retry policy applies unchanged; so
does one on redis-py's path that uvloop refuses with a ``RuntimeError`` (a closed transport).

The same classes pack commands with hiredis's C packer (``hiredis.pack_command``) where it
takes the arguments, str, bytes, int and float, which is every command Slipstream sends:
redis-py's asyncio connection packs in Python, ~12 µs for an ``ENQUEUE`` against ~2 µs.
The bytes are the same (``tests/test_redis_connection.py``); anything else (a bool, which
redis-py refuses, a memoryview, a command name of several words) takes redis-py's packer.
One difference is left: an int of 4,300 digits or more, which redis-py refuses with a
``ValueError`` (Python's limit on converting ints to text), crashes hiredis 3.5's packer;
no command of ours carries one (the JSON parser refuses such numbers in requests).

The same classes also bound the handshake of a new connection (``on_connect``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from hiredis import pack_command as _c_pack  # a dependency: redis[hiredis]
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError


class _WriteNow(AbstractConnection):
    async def on_connect(self) -> None:
        """The handshake without a health check: redis-py 5.3 runs one before the handshake's
        first command (``next_health_check`` starts at -1), its PING reconnects on failure,
        and the new connection's handshake runs another, each level retrying: against a
        server that accepts but never answers (a stopped Redis) that recursion waited for
        ever. A connection made a moment ago is as healthy as a PING would show."""
        self.next_health_check = asyncio.get_running_loop().time() + self.health_check_interval
        await super().on_connect()

    def pack_command(self, *args: Any) -> list[bytes]:
        name, encoder = args[0] if args else None, self.encoder
        if (
            type(name) is str
            and name.isalpha()  # one word (redis-py splits a name on any whitespace)
            and encoder.encoding == "utf-8"  # hiredis's (a URL's ?encoding= may say otherwise)
            and encoder.encoding_errors == "strict"
        ):
            try:
                return [_c_pack(args)]
            except TypeError:  # not str, bytes, int or float: redis-py's rules and errors
                pass
        packed: list[bytes] = super().pack_command(*args)
        return packed

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        writer = self._writer
        due = check_health and self.health_check_interval
        if (
            writer is None
            or self._reader is None
            or writer.transport.is_closing()
            or writer.transport.get_write_buffer_size()
            or (due and asyncio.get_running_loop().time() > self.next_health_check)
        ):
            try:
                await super().send_packed_command(command, check_health)
            except RuntimeError as exc:  # uvloop's closed transport, which redis-py passes on
                # as it is (it has disconnected): a stream reading its log during a Redis
                # restart died of it instead of retrying (a connection's handshake on a
                # socket the restarting server had just closed)
                raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
            return
        if isinstance(command, str):
            command = command.encode()
        try:
            writer.writelines([command] if isinstance(command, bytes) else command)
        except (OSError, RuntimeError) as exc:  # RuntimeError: uvloop's closed transport
            await self.disconnect(nowait=True)
            raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc


class WriteNowConnection(_WriteNow, Connection):
    """TCP (``redis://``)."""


class WriteNowSSLConnection(_WriteNow, SSLConnection):
    """TLS (``rediss://``)."""


class WriteNowUnixConnection(_WriteNow, UnixDomainSocketConnection):
    """A Unix socket (``unix://``)."""


class WriteNowSentinelConnection(_WriteNow, SentinelManagedConnection):
    """To the master a Sentinel set names (``redis+sentinel://``)."""


class WriteNowSentinelSSLConnection(_WriteNow, SentinelManagedSSLConnection):
    """To that master over TLS (``rediss+sentinel://``)."""


def write_now(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """The write-now variant of the class redis-py chose for a URL (others: itself)."""
    variants: dict[type[AbstractConnection], type[AbstractConnection]] = {
        Connection: WriteNowConnection,
        SSLConnection: WriteNowSSLConnection,
        UnixDomainSocketConnection: WriteNowUnixConnection,
        SentinelManagedConnection: WriteNowSentinelConnection,
        SentinelManagedSSLConnection: WriteNowSentinelSSLConnection,
    }
    return variants.get(connection_class, connection_class)
