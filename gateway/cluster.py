"""What the cluster looks like right now, read from Redis: queues, backlog, live workers.

Read on demand (a ``/metrics`` scrape, a dashboard poll), never in the background, so an idle
gateway costs Redis nothing. One pipeline answers every queue of every model.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from redis.exceptions import RedisError

from shared.fleet import known_models, live_workers
from shared.jobs import read_backlog
from shared.keys import CONSUMER_GROUP, Keys
from shared.models import Priority, WorkerInfo
from shared.redis import RedisClient

if TYPE_CHECKING:  # the state holds the metrics, which hold snapshots of this module
    from gateway.state import GatewayState

log = structlog.get_logger("slipstream.gateway")
CLUSTER_READ_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class QueueStats:
    model: str
    priority: str
    length: int  # XLEN: waiting and running entries (finished ones are deleted)
    lag: int  # entries the consumer group has not delivered yet
    pending: int  # delivered, not acknowledged (running)
    waiting_jobs: int  # from the backlog hash, kept by the Lua transitions
    waiting_tokens: int


@dataclass(frozen=True, slots=True)
class ModelStats:
    model: str
    workers: int
    capacity_tokens: int
    tokens_in_use: int
    tokens_per_s: float


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    queues: list[QueueStats]
    models: list[ModelStats]
    workers: list[WorkerInfo]


def _group(reply: Any, length: int) -> tuple[int, int]:
    """(lag, pending) of the workers' group; (length, 0) when the stream has none yet."""
    if not isinstance(reply, list):
        return length, 0  # no such key: nothing was ever queued
    for group in reply:
        if group.get("name") == CONSUMER_GROUP:
            pending = int(group.get("pending") or 0)
            lag = group.get("lag")
            # Redis cannot tell the lag after a deletion past the group's last read; every
            # finished entry is deleted, so what is left is waiting or pending.
            return (int(lag) if lag is not None else max(0, length - pending)), pending
    return length, 0


async def _queues(redis: RedisClient, keys: Keys, models: list[str]) -> list[QueueStats]:
    pairs = [(m, p) for m in models for p in Priority.ordered()]
    async with redis.pipeline(transaction=False) as pipe:
        for m, p in pairs:
            pipe.xlen(keys.queue(m, p))
            pipe.xinfo_groups(keys.queue(m, p))
        replies = await pipe.execute(raise_on_error=False)
    backlogs = await asyncio.gather(*(read_backlog(redis, keys, m) for m in models))
    backlog = dict(zip(models, backlogs, strict=True))
    out = []
    for i, (m, p) in enumerate(pairs):
        length = replies[2 * i] if isinstance(replies[2 * i], int) else 0
        lag, pending = _group(replies[2 * i + 1], length)
        tokens, jobs = backlog[m][p]
        out.append(QueueStats(m, p.value, length, lag, pending, max(0, jobs), max(0, tokens)))
    return out


def _models(models: list[str], workers: list[WorkerInfo]) -> list[ModelStats]:
    out = []
    for model in models:
        mine = [w for w in workers if w.model == model]
        out.append(
            ModelStats(
                model,
                len(mine),
                sum(w.capacity_tokens for w in mine),
                sum(w.tokens_in_use for w in mine),
                round(sum(w.tokens_per_s for w in mine), 3),
            )
        )
    return out


async def read_cluster(
    redis: RedisClient, keys: Keys, *, worker_ttl_s: float, models: list[str] | None = None
) -> ClusterSnapshot:
    """Queues of every known model (and ``models``), and the live workers' capacity."""
    workers = await live_workers(redis, keys, worker_ttl_s)
    names = await known_models(redis, keys)
    names |= set(models or ()) | {w.model for w in workers}
    ordered = sorted(names)
    queues = await _queues(redis, keys, ordered)
    workers.sort(key=lambda w: (w.model, w.id))
    return ClusterSnapshot(queues, _models(ordered, workers), workers)


async def refresh_cluster(state: GatewayState) -> ClusterSnapshot | None:
    """Read the cluster and set the gauges from it; None (gauges left as they were) on error.

    The read awaits; setting the gauges and rendering after it do not, so a scrape never sees
    half of one snapshot and half of another.
    """
    try:
        snap = await asyncio.wait_for(
            read_cluster(
                state.redis,
                state.keys,
                worker_ttl_s=state.settings.worker_ttl_s,
                models=state.settings.models,
            ),
            CLUSTER_READ_TIMEOUT_S,
        )
    except (RedisError, OSError, TimeoutError) as exc:
        state.metrics.cluster_errors.inc()
        log.warning("cluster_read_failed", error=str(exc) or type(exc).__name__)
        return None
    state.metrics.apply_cluster(snap)
    return snap
