"""``QueueScan``: the entries still waiting in a queue, as queue positions need them, one read
shared by every queued stream that asks.

A position is the number of entries (and their tokens) between the group's last delivered
entry and the job's own. Read per stream, that is an ``XRANGE`` of up to ``POSITION_SCAN``
entries for every queued stream at every progress note: at 10,000 streams with thousands
queued, those reads took a fifth of the gateway's CPU (py-spy). A scan is read at most every
``max_age_s`` a caller allows and shared by every caller until then (concurrent callers that
find it stale share one read), so a note may be that much behind the queue. The job API asks
with ``max_age_s=0`` and always reads the queue as it is.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from redis.exceptions import ResponseError

from gateway.snapshots import Snapshots
from shared.keys import CONSUMER_GROUP
from shared.redis import RedisClient

POSITION_SCAN = 1000  # most waiting entries a scan reads (a position past them is a floor)
KEEP_S = 60.0  # a scan nobody asked for this long is dropped (deferred streams come and go)


def entry_key(entry: str) -> tuple[int, int]:
    """A stream entry id (``ms-seq``) as a tuple that sorts as Redis orders the entries."""
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class Waiting:
    """One queue's waiting entries, oldest first, with their tokens summed along the way."""

    delivered: tuple[int, int]  # the group's last delivered entry: older ones have started
    entries: list[tuple[int, int]]
    tokens: list[int]  # tokens[i]: the tokens of entries[0..i]

    def ahead(self, entry: str) -> tuple[int, int] | None:
        """(jobs, tokens) waiting before ``entry``; None when it had been delivered, or had
        left the queue (cancelled), when the scan was read. An entry past the scanned ones
        (queued since, or beyond ``POSITION_SCAN``) has them all ahead: a floor."""
        key = entry_key(entry)
        if key <= self.delivered:
            return None
        at = bisect.bisect_left(self.entries, key)
        if at < len(self.entries) and self.entries[at] != key:
            return None  # between scanned entries but not among them: gone from the queue
        return at, self.tokens[at - 1] if at else 0


class QueueScan:
    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self.scans = Snapshots(self._scan, keep_s=KEEP_S)

    async def get(self, queue: str, max_age_s: float) -> Waiting:
        """The queue's waiting entries, read at most ``max_age_s`` ago."""
        return await self.scans.get(queue, max_age_s)

    async def _scan(self, queue: str) -> Waiting:
        try:
            groups = await self.redis.xinfo_groups(queue)
        except ResponseError:  # no such queue (yet)
            groups = []
        ours = [g.get("last-delivered-id") for g in groups if g.get("name") == CONSUMER_GROUP]
        delivered = str(ours[0] or "0-0") if ours else "0-0"
        rows = await self.redis.xrange(queue, f"({delivered}", "+", count=POSITION_SCAN)
        entries: list[tuple[int, int]] = []
        tokens: list[int] = []
        total = 0
        for entry, fields in rows:
            total += int(fields.get("cost", 0))
            entries.append(entry_key(entry))
            tokens.append(total)
        return Waiting(entry_key(delivered), entries, tokens)
