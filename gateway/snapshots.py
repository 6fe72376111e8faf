"""``Snapshots``: values read from Redis at most every so often, one read per key shared by
everyone who finds the last one stale.

``BacklogCache`` (a model's backlog, in front of admission) and ``QueueScan`` (a queue's waiting
entries, in front of queue positions) both trade a bounded staleness for one read instead of
one per request or per stream; this is that trade's mechanics, written once. A reader that
finds the snapshot stale awaits the read in flight or starts one; the read is shielded, so a
reader cancelled while it waits does not cancel it for the others. Snapshots not read again
within ``keep_s`` are dropped when a newer one is stored (keys that come and go, like tenants'
deferred streams, do not pile up).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class Snapshots(Generic[V]):
    def __init__(self, read: Callable[[str], Awaitable[V]], keep_s: float = math.inf) -> None:
        self.read = read
        self.keep_s = keep_s
        self.values: dict[str, tuple[float, V]] = {}  # key -> (read started at, value)
        self.reads: dict[str, asyncio.Future[V]] = {}

    async def get(self, key: str, max_age_s: float) -> V:
        """The value read at most ``max_age_s`` ago (a read starts no later than now)."""
        snapshot = self.values.get(key)
        if snapshot is not None and time.monotonic() - snapshot[0] < max_age_s:
            return snapshot[1]
        read = self.reads.get(key)
        if read is None:
            read = self.reads[key] = asyncio.ensure_future(self._read(key))
        return await asyncio.shield(read)

    def peek(self, key: str) -> V | None:
        """The last value read, however old (None: never read)."""
        snapshot = self.values.get(key)
        return None if snapshot is None else snapshot[1]

    async def _read(self, key: str) -> V:
        try:
            started = time.monotonic()
            value = await self.read(key)
            if self.keep_s < math.inf:
                cutoff = started - self.keep_s
                self.values = {k: v for k, v in self.values.items() if v[0] > cutoff}
            self.values[key] = (started, value)
            return value
        finally:
            del self.reads[key]
