"""Redis's clock: the one clock every host judges time by (leases, heartbeats, deadlines).

Hosts' wall clocks drift and jump; a worker 30 s ahead must not look fresh for 30 s longer,
nor one 30 s behind look dead. The scripts read ``TIME`` themselves; Python code asks Redis
(``redis_now_ms``) or keeps the offset to it (``RedisClock``) where a round trip per reading
would cost too much.
"""

from __future__ import annotations

import time

from shared.redis import RedisClient


async def redis_now_ms(redis: RedisClient) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


class RedisClock:
    """Redis's time read from the host's clock plus the offset measured at the last ``sync``
    (off by at most half that round trip, plus the host's drift since)."""

    __slots__ = ("offset_ms",)

    def __init__(self) -> None:
        self.offset_ms = 0

    async def sync(self, redis: RedisClient) -> None:
        before = time.time()
        remote = await redis_now_ms(redis)
        after = time.time()
        self.offset_ms = remote - int((before + after) * 500)

    def now_ms(self) -> int:
        return int(time.time() * 1000) + self.offset_ms
