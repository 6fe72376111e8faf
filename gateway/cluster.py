"""What the cluster looks like right now, read from Redis: queues, backlog, live workers,
dead letters, and which Redis masters answer.

Read on demand (a ``/metrics`` scrape, a dashboard poll), never in the background, so an idle
gateway costs Redis nothing. One pipeline answers every queue of every model.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from redis.asyncio import RedisCluster
from redis.exceptions import NoPermissionError, RedisError

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
    capacity_seqs: int = 0  # sum of the live workers' max_seqs
    seqs_in_use: int = 0
    dead_lettered: int = 0  # jobs ever added to the dead-letter stream (XINFO entries-added)


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


async def _dead_letters(redis: RedisClient, keys: Keys, models: list[str]) -> dict[str, int]:
    """Jobs ever added to each model's dead-letter stream: Redis 7's ``entries-added``, which
    trimming (the janitor caps the stream) does not lower, so it is a counter; 0 before the
    first poison job (no stream yet)."""
    async with redis.pipeline(transaction=False) as pipe:
        for m in models:
            pipe.xinfo_stream(keys.dead_letter(m))
        replies = await pipe.execute(raise_on_error=False)
    return {
        m: int(r.get("entries-added") or 0) if isinstance(r, dict) else 0
        for m, r in zip(models, replies, strict=True)
    }


def _models(models: list[str], workers: list[WorkerInfo], dead: dict[str, int]) -> list[ModelStats]:
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
                capacity_seqs=sum(w.max_seqs for w in mine),
                seqs_in_use=sum(w.seqs_in_use for w in mine),
                dead_lettered=dead.get(model, 0),
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
    queues, dead = await asyncio.gather(
        _queues(redis, keys, ordered), _dead_letters(redis, keys, ordered)
    )
    workers.sort(key=lambda w: (w.model, w.id))
    return ClusterSnapshot(queues, _models(ordered, workers, dead), workers)


async def master_run_ids(redis: RedisClient) -> frozenset[str]:
    """The ``run_id`` (INFO server) of every Redis master this client writes to.

    A plain or Sentinel client reaches one master: the one its connection resolves to now. A
    ``RedisCluster`` client is asked for every primary it knows (one per shard), since a bare
    ``INFO`` would go to its default node only. A master process that was not there before (a
    replica promoted by a failover, or a restart) has a new ``run_id``."""
    if isinstance(redis, RedisCluster):
        reply = await redis.info("server", target_nodes=RedisCluster.PRIMARIES)
        infos = [reply] if "run_id" in reply else list(reply.values())
    else:
        infos = [await redis.info("server")]
    return frozenset(str(info["run_id"]) for info in infos)


@dataclass(slots=True)
class MasterWatch:
    """The Redis masters seen at the previous read; counts the ones that are new since.

    Rule: a run_id absent from the previous successful read is one master change. The first
    read only sets the baseline (a gateway that starts after a failover does not count it); a
    failed read leaves the baseline alone, so the change is counted at the next read that
    succeeds. In Cluster mode a shard added by resharding counts too."""

    seen: frozenset[str] | None = None
    denied: bool = False  # the Redis user may not run INFO: stop asking (and logging)

    def changes(self, run_ids: frozenset[str]) -> int:
        new = 0 if self.seen is None else len(run_ids - self.seen)
        self.seen = run_ids
        return new


async def refresh_cluster(state: GatewayState) -> ClusterSnapshot | None:
    """Read the cluster and set the gauges from it; None (gauges left as they were) on error.

    The read awaits; setting the gauges and rendering after it do not, so a scrape never sees
    half of one snapshot and half of another. The masters' run_ids are asked meanwhile: a
    scrape during a failover waits for the slower of the two reads, not for their sum.
    """
    snap, _ = await asyncio.gather(_read(state), _watch_masters(state))
    if snap is not None:
        state.metrics.apply_cluster(snap)
    return snap


async def _read(state: GatewayState) -> ClusterSnapshot | None:
    try:
        return await asyncio.wait_for(
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


async def _watch_masters(state: GatewayState) -> None:
    """Count Redis master changes (``slipstream_gateway_redis_master_changes_total``). A
    failed INFO (Redis mid-failover, or an ACL without ``+info``) is logged and skipped; it is
    not a cluster read error (the gauges may well have been read)."""
    watch = state.metrics.masters
    if watch.denied:
        return
    try:
        run_ids = await asyncio.wait_for(master_run_ids(state.redis), CLUSTER_READ_TIMEOUT_S)
    except NoPermissionError as exc:
        watch.denied = True
        log.warning("redis_info_denied", error=str(exc), hint="grant the gateway user +info")
        return
    except (RedisError, OSError, TimeoutError, KeyError) as exc:
        log.warning("redis_info_failed", error=str(exc) or type(exc).__name__)
        return
    state.metrics.redis_master_changes.inc(watch.changes(run_ids))
