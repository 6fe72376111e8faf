"""The write-now connection (``shared/redis_connection.py``): commands written without a Task
each still see a dead connection, and are retried on a new one, as redis-py's own are; a new
connection's handshake times out against a server that never answers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.redis import connect
from shared.redis_cluster import SlipstreamCluster
from shared.redis_connection import (
    WriteNowConnection,
    WriteNowSentinelConnection,
    WriteNowSentinelSSLConnection,
    WriteNowSSLConnection,
    WriteNowUnixConnection,
)


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


class _ClosedWriter:
    """A stream writer whose transport uvloop has closed, with bytes still buffered (so the
    write takes redis-py's path): uvloop raises ``RuntimeError``, not ``OSError``."""

    class transport:
        @staticmethod
        def is_closing() -> bool:
            return False

        @staticmethod
        def get_write_buffer_size() -> int:
            return 1

    def writelines(self, data: Any) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

    def close(self) -> None:
        pass


async def test_a_write_uvloop_refuses_on_redis_pys_path_is_a_connection_error(
    redis_url: str,
) -> None:
    """redis-py passes uvloop's ``RuntimeError`` on as it is; callers that ride out Redis
    outages catch ``RedisError``/``OSError``, so it must arrive as a ``ConnectionError``."""
    client = connect(redis_url)
    try:
        connection = await client.connection_pool.get_connection()
        real, connection._writer = connection._writer, _ClosedWriter()  # type: ignore[assignment]
        with pytest.raises(RedisConnectionError):
            await connection.send_packed_command(b"*1\r\n$4\r\nPING\r\n")
        assert real is not None
        real.close()  # the stand-in was closed by the disconnect, not the socket
        await real.wait_closed()
        await client.connection_pool.release(connection)
        assert await client.ping()  # a new connection serves the next command
    finally:
        await client.aclose()


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
async def test_a_server_that_never_answers_times_the_command_out(scheme: str) -> None:
    """A stopped Redis accepts connections and answers nothing: the handshake of a new
    connection times out like any read (redis-py's own health check inside the handshake
    recursed through its retries and waited for ever; the Cluster client's too)."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never reads, never answers

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0" if scheme == "redis" else f"{scheme}://127.0.0.1:{port}"
    client = connect(url, socket_timeout=0.3)
    try:
        async with asyncio.timeout(30):  # the test's own bound; it took ~0.3 s here
            # the Cluster client reports the timeout as "no reachable node"
            with pytest.raises((RedisTimeoutError, RedisClusterException)):
                await client.set("k", "v")
    finally:
        await client.aclose()
        for writer in held:
            writer.close()
        server.close()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:1/0", WriteNowConnection),
        ("rediss://127.0.0.1:1/0", WriteNowSSLConnection),
        ("unix:///tmp/none.sock", WriteNowUnixConnection),
        ("redis+sentinel://127.0.0.1:1/mymaster", WriteNowSentinelConnection),
        ("rediss+sentinel://127.0.0.1:1/mymaster", WriteNowSentinelSSLConnection),
        ("redis+cluster://127.0.0.1:1", WriteNowConnection),  # every node's connections
    ],
)
async def test_every_url_kind_builds_its_client(url: str, expected: type) -> None:
    """Building a client opens no socket, so every kind is checked here, not only in the
    fault suite (a Cluster URL once failed here, with nothing outside that suite to see it)."""
    client = connect(url)
    try:
        if isinstance(client, SlipstreamCluster):
            manager = client.nodes_manager
            assert manager.connection_kwargs["connection_class"] is expected
            assert all(n.connection_class is expected for n in manager.startup_nodes.values())
        else:
            assert client.connection_pool.connection_class is expected
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "args",
    [
        ("EVALSHA", "ab" * 20, 2, "slip:{m}:job:1", "slip:{m}:queue:normal", '{"prompt":"é☃"}', 0),
        ("SET", "k", 1.5, "PX", 10**30, b"\x00\xff", ""),
        ("SET", "k", float("inf"), -0.0, 1e100),
        ("CONFIG GET", "maxmemory"),  # a name of two words: redis-py splits it
        ("CONFIG\tGET", "maxmemory"),  # ... on any whitespace
    ],
)
def test_commands_are_packed_as_redis_py_packs_them(args: tuple[Any, ...]) -> None:
    """hiredis's C packer where it takes the arguments; the same bytes as redis-py's."""
    ours, theirs = WriteNowConnection(), Connection()
    assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args))


def test_an_argument_redis_py_refuses_is_refused_as_it_does() -> None:
    with pytest.raises(DataError, match="bool"):
        WriteNowConnection().pack_command("SET", "k", True)
