"""The worker's entry in the registry, refreshed by a heartbeat that also renews leases."""

from __future__ import annotations

import os
import socket
import uuid

from shared.clock import redis_now_ms
from shared.keys import Keys
from shared.models import WorkerInfo
from shared.redis import RedisClient


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Registry:
    """Writes ``WorkerInfo`` under ``keys.workers`` and scores it in ``keys.workers_seen``."""

    def __init__(self, redis: RedisClient, keys: Keys, info: WorkerInfo) -> None:
        self.redis = redis
        self.keys = keys
        self.info = info

    async def beat(self, **changes: object) -> None:
        """Stamped with Redis's time, which every reader judges it by: this host's clock may
        run ahead or behind without the worker looking fresher or dead."""
        now = await redis_now_ms(self.redis)
        info = self.info.model_copy(update={**changes, "heartbeat_at_ms": now})
        self.info = info
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.workers, info.id, info.model_dump_json())
            pipe.zadd(self.keys.workers_seen, {info.id: info.heartbeat_at_ms})
            pipe.sadd(self.keys.models, info.model)
            pipe.hset(self.keys.throughput(info.model), info.id, f"{info.tokens_per_s:.3f}")
            await pipe.execute()

    async def leave(self) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hdel(self.keys.workers, self.info.id)
            pipe.zrem(self.keys.workers_seen, self.info.id)
            pipe.hdel(self.keys.throughput(self.info.model), self.info.id)
            await pipe.execute()
