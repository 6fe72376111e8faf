"""``Advertiser``: what a worker tells the pull script about itself, for warm-state routing.

Two keys per worker and model, both expiring with the worker (``SLIPSTREAM_WORKER_TTL_S``,
by Redis's clock): ``worker:<id>`` (free tokens and sequence slots, also written by every
pull) and ``warm:<id>``, the set of prefix block hashes the engine holds warm
(``WarmPrefixes.blocks()``, bounded by the engine's ``max_blocks``).

The trade-off: the set is sent as a diff against what was last written (SADD the new blocks,
SREM the evicted ones) rather than rewritten whole, so a job's end costs a few dozen
members, not thousands. A diff needs the key to still hold what we wrote: when ``PEXPIRE``
says the key is gone (Redis restarted, or this worker was silent past its TTL) the next sync
writes it whole.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress

from redis.exceptions import RedisError

from shared.keys import Keys
from shared.redis import RedisClient
from worker.warm import WarmPrefixes


class Advertiser:
    """Keeps one worker's ``worker:<id>`` and ``warm:<id>`` keys current."""

    def __init__(
        self, redis: RedisClient, keys: Keys, model: str, worker_id: str, ttl_ms: int, caps: int = 0
    ) -> None:
        self.redis = redis
        self.caps = caps  # the engine's capability bits (PULL reserves feature jobs by them)
        self.model = model
        self.worker_id = worker_id
        self.ttl_ms = ttl_ms
        self.state_key = keys.worker_state(model, worker_id)
        self.warm_key = keys.warm(model, worker_id)
        self.members_key = keys.members(model)
        self.sent: set[str] = set()
        self.sent_version = -1
        self.whole = True  # the next sync rewrites the set whole
        self.changed = asyncio.Event()

    async def beat(self, free_tokens: int, free_seqs: int, warm: WarmPrefixes | None) -> None:
        """Heartbeat: capacity now, the warm set's expiry, and any change to the set."""
        async with self.redis.pipeline(transaction=False) as pipe:
            state = {"free": free_tokens, "seqs": free_seqs, "caps": self.caps}
            pipe.hset(self.state_key, mapping=state)
            pipe.pexpire(self.state_key, self.ttl_ms)
            pipe.sadd(self.members_key, self.worker_id)
            pipe.pexpire(self.warm_key, self.ttl_ms)
            replies = await pipe.execute()
        if warm is not None and self.sent and not replies[3]:
            self.whole = True  # the set expired under us
        await self.sync(warm)

    async def sync(self, warm: WarmPrefixes | None) -> None:
        """Write the warm set's changes since the last sync (the whole set when needed)."""
        if warm is None or (warm.version == self.sent_version and not self.whole):
            return
        version, blocks = warm.version, warm.blocks()
        added = blocks if self.whole else blocks - self.sent
        removed = set() if self.whole else self.sent - blocks
        whole, self.whole = self.whole, True  # until this write is known to have landed
        async with self.redis.pipeline(transaction=False) as pipe:
            if whole:
                pipe.delete(self.warm_key)
            if added:
                pipe.sadd(self.warm_key, *added)
            if removed:
                pipe.srem(self.warm_key, *removed)
            pipe.pexpire(self.warm_key, self.ttl_ms)
            await pipe.execute()
        self.sent, self.sent_version, self.whole = blocks, version, False

    async def run(self, warm: WarmPrefixes | None, debounce_s: float = 0.02) -> None:
        """Sync soon after each ``changed`` (a job ended), until cancelled."""
        while True:
            await self.changed.wait()
            await asyncio.sleep(debounce_s)  # one write for the jobs that end together
            self.changed.clear()
            with suppress(RedisError, OSError):
                await self.sync(warm)
