"""What the registry says about the fleet: live workers, known models."""

from __future__ import annotations

from shared.clock import redis_now_ms
from shared.keys import Keys
from shared.models import WorkerInfo
from shared.redis import RedisClient


async def live_workers(redis: RedisClient, keys: Keys, ttl_s: float) -> list[WorkerInfo]:
    """Workers whose last heartbeat is younger than ``ttl_s`` by Redis's clock, the one
    heartbeats are stamped with (shared by status tools)."""
    cutoff = await redis_now_ms(redis) - int(ttl_s * 1000)
    ids: list[str] = await redis.zrangebyscore(keys.workers_seen, cutoff, "+inf")
    if not ids:
        return []
    rows: list[str | None] = await redis.hmget(keys.workers, ids)  # type: ignore[misc]
    return [WorkerInfo.model_validate_json(r) for r in rows if r]


async def known_models(redis: RedisClient, keys: Keys) -> set[str]:
    """Every model a worker has ever served."""
    members: set[str] = await redis.smembers(keys.models)  # type: ignore[misc]
    return {str(m) for m in members}
