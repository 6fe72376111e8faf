"""The pool's checkout (``shared/redis_pool.py``): a clean idle connection is handed out
without waiting for the event loop; one holding an unread reply, or closed, never is; a pool
at its limit still serves every command, in turn."""

from __future__ import annotations

import asyncio

from redis.asyncio.connection import AbstractConnection

from shared.redis import connect
from shared.redis_pool import ReadyPool, idle_and_clean


def checkout_now(pool: ReadyPool) -> AbstractConnection:
    """The connection ``get_connection`` returns without yielding to the loop (it raises
    ``StopIteration`` at its first step); fails when the checkout would wait."""
    step = pool.get_connection()
    try:
        step.send(None)
    except StopIteration as done:
        connection: AbstractConnection = done.value
        return connection
    step.close()
    raise AssertionError("the checkout waited for the event loop")


async def test_a_clean_idle_connection_is_handed_out_without_a_loop_turn(redis_url: str) -> None:
    client = connect(redis_url)
    try:
        assert await client.set("k", "v") is True
        pool = client.connection_pool
        assert isinstance(pool, ReadyPool)
        connection = checkout_now(pool)
        assert idle_and_clean(connection)
        await pool.release(connection)
        assert await client.get("k") == "v"
    finally:
        await client.aclose()


async def test_a_connection_holding_an_unread_reply_is_never_handed_out_as_it_is(
    redis_url: str,
) -> None:
    """A reply nobody read (a command abandoned without the disconnect redis-py does) would
    answer the next command: the checkout sees the bytes and takes redis-py's path, which
    reconnects."""
    client = connect(redis_url)
    try:
        await client.set("k", "stale")
        pool = client.connection_pool
        connection = await pool.get_connection()
        await connection.send_command("GET", "k")  # its reply is never read
        await asyncio.sleep(0.1)  # the reply reaches the connection's reader
        assert not idle_and_clean(connection)
        await pool.release(connection)
        assert await client.incr("n") == 1  # not "stale"
        assert await client.get("k") == "stale"
    finally:
        await client.aclose()


async def test_a_connection_the_server_closed_is_not_handed_out(redis_url: str) -> None:
    client = connect(redis_url, client_name="pool-test")
    killer = connect(redis_url)
    try:
        await client.set("k", "v")
        pool = client.connection_pool
        (connection,) = pool._available_connections  # type: ignore[attr-defined]
        assert await killer.client_kill_filter(_type="normal", skipme=True) >= 1
        await asyncio.sleep(0.1)  # the loop sees the EOF
        assert not idle_and_clean(connection)
        assert await client.get("k") == "v"
    finally:
        await client.aclose()
        await killer.aclose()


async def test_a_pool_at_its_limit_serves_every_command_in_turn(redis_url: str) -> None:
    client = connect(redis_url, max_connections=2)
    try:
        replies = await asyncio.gather(*(client.incr("count") for _ in range(200)))
        assert sorted(replies) == list(range(1, 201))
        pool = client.connection_pool
        assert len(pool._available_connections) <= 2  # type: ignore[attr-defined]
        assert not pool._in_use_connections  # type: ignore[attr-defined]
    finally:
        await client.aclose()
