"""The write-now connection (``shared/redis_connection.py``): commands written without a Task
each still see a dead connection, and are retried on a new one, as redis-py's own are."""

from __future__ import annotations

import asyncio

from shared.redis import connect
from shared.redis_connection import WriteNowConnection


async def test_a_killed_connection_is_replaced_and_the_command_retried(redis_url: str) -> None:
    client = connect(redis_url, client_name="write-now-test")
    killer = connect(redis_url)
    try:
        assert client.connection_pool.connection_class is WriteNowConnection
        await client.set("k", "v")
        killed = await killer.client_kill_filter(_type="normal", skipme=True)
        assert killed >= 1
        assert await client.get("k") == "v"  # written on the dead socket, retried on a new one
    finally:
        await client.aclose()
        await killer.aclose()


async def test_a_write_the_socket_cannot_take_at_once_waits_for_it(redis_url: str) -> None:
    """A command larger than the socket's buffer leaves bytes in the transport: the next one
    takes redis-py's path (``drain`` under its timeout), and both replies come back right."""
    client = connect(redis_url)
    try:
        big = "x" * 8_000_000
        first = asyncio.ensure_future(client.set("big", big))
        assert await client.strlen("big") in (0, len(big))  # on another pooled connection
        assert await first is True
        assert await client.strlen("big") == len(big)
    finally:
        await client.aclose()
