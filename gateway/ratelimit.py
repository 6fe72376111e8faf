"""Per-key rate limits (requests/min, tokens/min) shared by every gateway replica.

The counters are the ``limits`` library's sliding-window counters in the gateway's own Redis
(keys ``<prefix>:ratelimit:...``), so two replicas draw from one budget. A request costs one
request and ``job.cost_tokens`` tokens (prompt estimate + max_tokens, as OpenAI counts it at
admission). The requests limit is charged first: a request it refuses costs nothing; one the
tokens limit refuses has used a request. Answers carry OpenAI's ``x-ratelimit-*`` headers.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.asyncio import Redis

from gateway.apikeys import ApiKey
from shared.errors import RateLimited
from shared.models import Job


def storage_uri(redis_url: str) -> str:
    """The ``limits`` storage URI for a Redis URL (it only names the scheme: the pool is ours)."""
    if redis_url.startswith("unix://"):
        return "async+redis+unix://" + redis_url.removeprefix("unix://")
    return "async+" + redis_url


class RateLimits:
    def __init__(self, redis: Redis, redis_url: str, prefix: str) -> None:
        shared_pool: dict[str, Any] = {"connection_pool": redis.connection_pool}
        storage = RedisStorage(
            storage_uri(redis_url),
            implementation="redispy",
            key_prefix=f"{prefix}:ratelimit",
            **shared_pool,
        )
        self.limiter = SlidingWindowCounterRateLimiter(storage)

    async def charge(self, key: ApiKey | None, job: Job) -> dict[str, str]:
        """Charge ``job`` to ``key``'s budgets; the headers to send, or ``RateLimited``."""
        if key is None or not (key.rpm or key.tpm):
            return {}
        checks: list[tuple[str, RateLimitItem, int]] = []
        if key.rpm:
            checks.append(("requests", RateLimitItemPerMinute(key.rpm), 1))
        if key.tpm:
            checks.append(("tokens", RateLimitItemPerMinute(key.tpm), job.cost_tokens))
        for name, item, cost in checks:
            if not await self.limiter.hit(item, key.key_hash, name, cost=cost):
                headers = await self.headers(key, checks)
                wait = self.retry_after(item, cost, headers, name)
                raise RateLimited(
                    f"rate limit reached: {item.amount} {name} per minute for this API key; "
                    f"retry in {wait} s",
                    code="rate_limit_exceeded",
                    headers={**headers, "Retry-After": str(wait)},
                )
        return await self.headers(key, checks)

    async def headers(
        self, key: ApiKey, checks: list[tuple[str, RateLimitItem, int]]
    ) -> dict[str, str]:
        stats = await asyncio.gather(
            *(self.limiter.get_window_stats(item, key.key_hash, name) for name, item, _ in checks)
        )
        now = time.time()
        out: dict[str, str] = {}
        for (name, item, _), stat in zip(checks, stats, strict=True):
            out[f"x-ratelimit-limit-{name}"] = str(item.amount)
            out[f"x-ratelimit-remaining-{name}"] = str(max(0, stat.remaining))
            out[f"x-ratelimit-reset-{name}"] = f"{max(0, math.ceil(stat.reset_time - now))}s"
        return out

    @staticmethod
    def retry_after(item: RateLimitItem, cost: int, headers: dict[str, str], name: str) -> int:
        """Seconds until ``cost`` fits the sliding window again (at least 1, at most 60).

        The window's weighted count falls linearly as the previous minute slides out, so the
        shortfall takes ``shortfall / amount`` of a minute to free (a request larger than the
        whole budget never fits: it is told to wait the full minute).
        """
        remaining = int(headers.get(f"x-ratelimit-remaining-{name}", "0"))
        if cost > item.amount:
            return 60
        shortfall = cost - remaining
        return max(1, min(60, math.ceil(60 * shortfall / item.amount)))
