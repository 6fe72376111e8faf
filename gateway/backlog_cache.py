"""``BacklogCache``: each model's queue backlog as admission weighs it, without a Redis
round trip in front of every request.

A snapshot is read from Redis at most every ``max_age_s``; concurrent requests that find it
stale share one read. Between reads, what this gateway admits is added to the snapshot, so a
burst through one gateway is counted at once; what other gateways admit, and what workers
take off the queues, shows up at the next read. Admission is an estimate either way (the
queue moves while a request is checked), so a snapshot a few tens of milliseconds old costs
no accuracy that matters, and takes a round trip off every request's time to first token.
"""

from __future__ import annotations

from gateway.snapshots import Snapshots
from shared.jobs import read_backlog
from shared.keys import Keys
from shared.models import Priority
from shared.redis import RedisClient

Backlog = dict[Priority, tuple[int, int]]  # queued (tokens, jobs) per priority


class BacklogCache:
    def __init__(self, redis: RedisClient, keys: Keys, max_age_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.max_age_s = max_age_s
        self.snapshots = Snapshots(self._read)  # model -> its backlog

    async def get(self, model: str) -> Backlog:
        """The model's backlog, read at most ``max_age_s`` ago (``0``: read now)."""
        if self.max_age_s <= 0:
            return await self._read(model)
        return await self.snapshots.get(model, self.max_age_s)

    async def _read(self, model: str) -> Backlog:
        return await read_backlog(self.redis, self.keys, model)

    def add(self, model: str, priority: Priority, tokens: int) -> None:
        """Count a job this gateway admitted until the next read sees it in Redis."""
        backlog = self.snapshots.peek(model)
        if backlog is not None:
            queued, jobs = backlog.get(priority, (0, 0))
            backlog[priority] = (queued + tokens, jobs + 1)
