"""The one way to open a Redis connection: timeouts on, retries with jittered backoff."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

T = TypeVar("T")


class _Retry(Retry):
    """redis-py's async retry (``redis.retry.Retry``, the sync one, never retries the async
    client: its loop returns the coroutine unawaited), except for a refused login.

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

        try:
            return await super().call_with_retry(once, fail)
        except _Refused as refused:
            raise refused.error from None


class _Refused(Exception):
    """Carries an ``AuthenticationError`` past the retry loop (which would retry it)."""

    def __init__(self, error: AuthenticationError) -> None:
        super().__init__(str(error))
        self.error = error


def connect(
    url: str,
    *,
    socket_timeout: float | None = 10.0,
    max_connections: int | None = 512,
    client_name: str | None = None,
) -> Redis:
    """A pooled async client for ``url`` (``redis://``, ``rediss://`` or ``unix://``).

    ``socket_timeout`` bounds every reply; blocking commands pass a smaller ``BLOCK`` than it.
    Connection errors are retried with equal-jitter backoff so that a fleet reconnecting after
    a Redis restart does not arrive as one herd. A retry may replay a command that already ran
    (only its reply was lost): every Lua script is safe to repeat (``shared/lua.py``).
    """
    retry = _Retry(EqualJitterBackoff(cap=2.0, base=0.05), retries=6)
    # Blocking: a burst of more concurrent commands than connections waits for a free one
    # (up to ``socket_timeout``) instead of failing with "Too many connections".
    pool = BlockingConnectionPool.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=5.0,
        health_check_interval=15,
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        max_connections=max_connections or 512,
        timeout=socket_timeout,
        client_name=client_name,
    )
    client: Redis = Redis.from_pool(pool)  # aclose() closes the pool too
    return client
