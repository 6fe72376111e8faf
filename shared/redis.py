"""The one way to open a Redis connection: timeouts on, retries with jittered backoff,
Sentinel-managed masters (``redis+sentinel://``) for high availability, and Redis Cluster
(``redis+cluster://``) for scale.

``RedisClient`` is what every Slipstream module holds: a ``Redis`` (one server, or the master
a Sentinel set names) or a ``RedisCluster``. Code written against it uses only what both
offer: commands, non-transactional pipelines, the scripts of ``shared/scripts.py``. Pub/sub
is not among them (the asyncio cluster client has none): ``shared/pubsub.py`` opens its own
connections, through ``open_node_connection``, to whichever node owns a channel.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar, overload

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import EqualJitterBackoff
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.redis_cluster import SlipstreamCluster
from shared.redis_connection import write_now
from shared.redis_pool import ReadyPool, ReadySentinelPool
from shared.settings import ClusterUrl, SentinelUrl, parse_cluster_url, parse_sentinel_url

RedisClient: TypeAlias = Redis | RedisCluster
T = TypeVar("T")
R = TypeVar("R", bound=Redis)


class _Retry(Retry):
    """redis-py's async retry (``redis.retry.Retry``, the sync one, never retries the async
    client: its loop returns the coroutine unawaited), except for a refused login.

    A write to a connection whose transport closed (the server died, a failover) raises
    ``RuntimeError`` under uvloop ("the handler is closed") where asyncio raises an ``OSError``
    that redis-py turns into a ``ConnectionError``: it becomes one here, so it is retried on a
    new connection (seen: a stream cut during a Sentinel failover).

    ``AuthenticationError`` is a ``ConnectionError`` to redis-py, but a wrong password does not
    heal with time, and retrying it recurses: the health check's PING reconnects, whose first
    command runs the health check again (redis-py 5.3).
    """

    async def call_with_retry(
        self, do: Callable[[], Awaitable[T]], fail: Callable[[RedisError], Any]
    ) -> T:
        async def once() -> T:
            try:
                return await do()
            except AuthenticationError as exc:
                raise _Refused(exc) from exc
            except RuntimeError as exc:  # retried like the connection error it is
                raise RedisConnectionError(f"connection lost: {exc}") from exc

        try:
            return await super().call_with_retry(once, fail)
        except _Refused as refused:
            raise refused.error from None


class _Refused(Exception):
    """Carries an ``AuthenticationError`` past the retry loop (which would retry it)."""

    def __init__(self, error: AuthenticationError) -> None:
        super().__init__(str(error))
        self.error = error


@overload
def connect(
    url: str,
    *,
    socket_timeout: float | None = 10.0,
    max_connections: int | None = 512,
    client_name: str | None = None,
    decode_responses: bool = True,
) -> RedisClient: ...


@overload
def connect(
    url: str,
    *,
    socket_timeout: float | None = 10.0,
    max_connections: int | None = 512,
    client_name: str | None = None,
    decode_responses: bool = True,
    redis_class: type[R],
) -> R: ...


def connect(
    url: str,
    *,
    socket_timeout: float | None = 10.0,
    max_connections: int | None = 512,
    client_name: str | None = None,
    decode_responses: bool = True,
    redis_class: type[Redis] = Redis,
) -> RedisClient:
    """A pooled async client for ``url``: ``redis://``, ``rediss://``, ``unix://``, a
    Sentinel URL (``redis+sentinel://``, ``rediss+sentinel://``) or a Cluster URL
    (``redis+cluster://``, ``rediss+cluster://``; ``shared/settings.py``).

    ``socket_timeout`` bounds every reply; blocking commands pass a smaller ``BLOCK`` than it.
    Connection errors are retried with equal-jitter backoff so that a fleet reconnecting after
    a Redis restart does not arrive as one herd. A retry may replay a command that already ran
    (only its reply was lost): every Lua script is safe to repeat (``shared/lua/``). Under
    Sentinel every (re)connection asks the sentinels for the master first, so the same retries
    carry a command across a failover once the sentinels have promoted a replica.
    """
    options: dict[str, Any] = {
        "decode_responses": decode_responses,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 15,
        "retry": _Retry(EqualJitterBackoff(cap=2.0, base=0.05), retries=6),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        # Blocking: a burst of more concurrent commands than connections waits for a free one
        # (up to ``socket_timeout``) instead of failing with "Too many connections".
        "max_connections": max_connections or 512,
        "timeout": socket_timeout,
        "client_name": client_name,
    }
    target = parse_sentinel_url(url)
    if target is not None:
        return _sentinel_master(target, redis_class, options)
    nodes = parse_cluster_url(url)
    if nodes is not None:
        return _cluster(nodes, options)
    pool = ReadyPool.from_url(url, **options)  # shared/redis_pool.py
    pool.connection_class = write_now(pool.connection_class)  # shared/redis_connection.py
    return redis_class.from_pool(pool)  # aclose() closes the pool too


def _sentinel_master(
    target: SentinelUrl, redis_class: type[Redis], options: dict[str, Any]
) -> Redis:
    """A client of ``target``'s current master, found through its sentinels."""
    tls: dict[str, Any] = {"ssl": True, **target.tls_options} if target.tls else {}
    sentinel_options = {
        "socket_timeout": min(options["socket_timeout"] or 2.0, 2.0),  # ask the next one
        "socket_connect_timeout": options["socket_connect_timeout"],
        "username": target.sentinel_username,
        "password": target.sentinel_password,
        **tls,
    }
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels), sentinel_kwargs=sentinel_options
    )
    client: Redis = sentinel.master_for(
        target.service,
        redis_class=redis_class,
        connection_pool_class=ReadySentinelPool,
        db=target.db,
        username=target.username,
        password=target.password,
        **tls,
        **options,
    )
    pool = client.connection_pool
    pool.connection_class = write_now(pool.connection_class)  # shared/redis_connection.py
    return client


def _cluster(target: ClusterUrl, options: dict[str, Any]) -> RedisCluster:
    """A Redis Cluster client starting from ``target``'s nodes (redis-py's, with the failure
    behaviour of ``shared/redis_cluster.py``).

    A dead node fails fast: one reconnection attempt, a one-second connect timeout. The slot
    map is re-read (under one lock for the whole client) after a node fails, from the first
    node that answers; a node that kept every command waiting through seconds of reconnection
    backoff would hold up the other shards' commands behind that refresh (seen: leases of
    healthy shards expired). A command to the dead shard itself is retried by redis-py on
    the new map (three times), then by its caller, as any Redis error is; the shard comes
    back when its replica is promoted. Connections per node are not capped (redis-py's
    cluster client fails, rather than waits, past its cap).
    """
    tls: dict[str, Any] = {"ssl": True, **target.tls_options} if target.tls else {}
    options = {k: v for k, v in options.items() if k not in ("max_connections", "timeout")}
    options["retry"] = _Retry(EqualJitterBackoff(cap=0.25, base=0.05), retries=1)
    options["socket_connect_timeout"] = 1.0
    client: RedisCluster = SlipstreamCluster(  # type: ignore[abstract]
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        username=target.username,
        password=target.password,
        # a map with a dead master's slots uncovered still serves the other shards
        require_full_coverage=False,
        **tls,
        **options,
    )
    return client


async def open_node_connection(client: RedisClient, key: str) -> AbstractConnection:
    """A new connection, outside any pool, to the node that owns ``key``'s slot (the one
    server, or under Sentinel the current master): for a pub/sub connection that must
    stay on one node. The caller disconnects it."""
    if isinstance(client, RedisCluster):
        await client.initialize()  # no-op unless a failure asked for a fresh slot map
        node = client.nodes_manager.get_node_from_slot(client.keyslot(key))
        connection: AbstractConnection = node.connection_class(**node.connection_kwargs)
    else:
        connection = client.connection_pool.make_connection()  # type: ignore[assignment]
    await connection.connect()  # type: ignore[no-untyped-call]
    return connection


async def node_name(client: RedisClient, key: str) -> str:
    """The ``host:port`` of the node owning ``key``'s slot as the client knows it now ('' for
    a single server: there is one); a cluster client reads its first slot map here."""
    if isinstance(client, RedisCluster):
        await client.initialize()
        name: str = client.nodes_manager.get_node_from_slot(client.keyslot(key)).name
        return name
    return ""


def forget_slot_map(client: RedisClient) -> None:
    """Make a cluster client re-read the slot map soon, in the background (after a node it
    used failed or answered MOVED); nothing for a single server."""
    if isinstance(client, SlipstreamCluster):
        client.refresh_soon()
