"""The connection pool: redis-py's ``BlockingConnectionPool`` with a checkout that does not
wait for the event loop.

redis-py 5.3 checks each connection it hands out by reading from it under a zero timeout
(``ensure_connection`` → ``can_read_destructive``). The read always waits, so every command
costs a turn of the event loop, a timer and a cancelled read, on top of an
``asyncio.timeout`` and the pool's ``Condition`` around the checkout (and the release):
~15 µs of a GET's ~33 µs of client CPU (``python -m bench.micro redis``), and the turn lets
other work run between two commands meant to leave together (the gateway's ``SSUBSCRIBE``
and its ``ENQUEUE``).

Here an idle connection is handed out at once when nobody waits for the pool and the
connection shows, without a read, that it is up and holds nothing unread: its transport
open, its reader neither at EOF nor holding bytes, hiredis's parser holding no reply.
Anything else takes redis-py's path, its check included.

What that check would catch beyond ours is a reply that reached the socket but not yet the
reader, and only a command abandoned without a disconnect leaves one: redis-py disconnects a
connection whose send or read raises (cancellation and timeouts included), and a closed
connection takes redis-py's path here. The one exception in redis-py is a pipeline whose
response callback raises something other than a ``ResponseError`` (the connection goes back
open); none of the callbacks the project's commands use raises on Redis's replies, and
redis-py's check missed a reply still on its way just the same (a review's experiments:
``docs/benchmarks.md``, round 9). A connection the server closed while idle is found
when the loop has seen its EOF (the next turn after it arrives), or else by the command's
read, which raises ``ConnectionError``: the retry policy (``shared/redis.py``) sends the
command again on a new connection after its first backoff (50-100 ms) where redis-py's check
would have reconnected at once; the command had not reached Redis, so nothing runs twice.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.sentinel import SentinelConnectionPool


def idle_and_clean(connection: AbstractConnection) -> bool:
    """Up, with nothing unread in its reader or its parser (no read, no wait)."""
    reader: Any = getattr(connection, "_reader", None)
    writer: Any = getattr(connection, "_writer", None)
    if reader is None or writer is None or writer.transport.is_closing() or reader.at_eof():
        return False
    if getattr(reader, "_buffer", b"?"):  # bytes the loop read that nobody parsed
        return False
    parser: Any = getattr(getattr(connection, "_parser", None), "_reader", None)
    has_data = getattr(parser, "has_data", None)  # hiredis's reader (hiredis >= 3)
    return has_data is not None and not has_data()


class ReadyPool(BlockingConnectionPool):
    """``BlockingConnectionPool`` whose checkout of a clean idle connection is synchronous."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiting = 0  # checkouts in redis-py's path: they go first

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        idle = self._available_connections
        if idle and not self._waiting and idle_and_clean(idle[-1]):
            return self.get_available_connection()  # type: ignore[no-any-return,no-untyped-call]
        self._waiting += 1
        try:
            return await super().get_connection()  # type: ignore[no-any-return]
        finally:
            self._waiting -= 1

    async def release(self, connection: AbstractConnection) -> None:
        """Back to the idle list; through the ``Condition`` (to wake a waiter) only when a
        checkout is in redis-py's path, the only place anything waits on it."""
        if self._waiting:
            await super().release(connection)
        else:
            await ConnectionPool.release(self, connection)


class ReadySentinelPool(SentinelConnectionPool, ReadyPool):
    """redis-py's Sentinel pool (each new connection asks the sentinels for the master, and
    idle connections to a replaced master are dropped, so they take redis-py's path) that
    waits for a free connection, like ``ReadyPool``, instead of failing with "Too many
    connections"."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # the client closes (a new master drops only idle ones)
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.aclose()
