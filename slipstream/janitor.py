"""``slipstream janitor``: the control plane's housekeeping, as arq cron jobs.

Four chores, each an arq cron job firing every ``janitor_interval_s``:

- ``clean_workers``: drop registry entries (``workers``, ``workers:seen``, the model's
  ``throughput`` field) of workers silent for ``dead_worker_factor`` x ``worker_ttl_s``.
- ``sweep_leases``: ``JobStore.sweep_expired_leases(model)`` for every model (fails over jobs
  whose worker died even when no other worker of that model is pulling).
- ``trim_streams``: XTRIM MINID each queue below the oldest entry still needed (the oldest
  pending entry, or the first one not yet delivered), so a pending or waiting job is never
  dropped; the dead-letter stream is capped at ``dead_letter_maxlen`` (approximately).
- ``rollup_stats``: sum the live workers' tokens/s, capacity and use per model into
  ``stats(model)``.

Any number of janitors may run: arq gives every firing the job id ``cron:<task>:<time>`` and
enqueues it only if no job or result with that id exists, and only one janitor can mark it
in progress, so each chore runs once per period cluster-wide. Results are kept for
``10 x interval`` so that a late janitor cannot enqueue a firing that already ran. arq's
serializer is JSON here, never pickle.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import structlog
from arq import cron
from arq.connections import ArqRedis
from arq.cron import CronJob
from arq.worker import Worker as ArqWorker
from pydantic import Field, field_validator, model_validator
from redis.exceptions import ResponseError

from shared.clock import redis_now_ms
from shared.fleet import known_models, live_workers
from shared.jobs import JobStore
from shared.keys import Keys
from shared.models import WorkerInfo
from shared.redis import RedisClient, connect
from shared.settings import CommonSettings, is_cluster_url

log = structlog.get_logger("slipstream.janitor")
JANITOR_LOG_MAXLEN = 1000
MAX_SEQ = 2**64 - 1


class JanitorSettings(CommonSettings):
    janitor_interval_s: int = Field(
        default=10,
        gt=0,
        description="Period of every chore; divides 60, or is whole minutes dividing 60 minutes",
    )
    dead_worker_factor: float = Field(
        default=10.0,
        ge=1,
        description="A worker silent this many times worker_ttl_s leaves the registry",
    )
    dead_letter_maxlen: int = Field(
        default=10000, gt=0, description="Entries kept (approximately) in each dead-letter stream"
    )
    control_redis_url: str = Field(
        default="",
        description=(
            "Redis (plain or Sentinel) for the janitor's arq queue; default REDIS_URL. "
            "Required when REDIS_URL is a Redis Cluster (arq has no Cluster support)"
        ),
    )

    @model_validator(mode="after")
    def _arq_needs_one_server(self) -> JanitorSettings:
        if is_cluster_url(self.control_redis_url or self.redis_url):
            raise ValueError(
                "arq has no Redis Cluster support: set SLIPSTREAM_CONTROL_REDIS_URL to a plain "
                "or Sentinel Redis for the janitor's queue (its chores still work on the cluster)"
            )
        return self

    @property
    def arq_url(self) -> str:
        """Where the janitor's arq queue lives."""
        return self.control_redis_url or self.redis_url

    @field_validator("janitor_interval_s")
    @classmethod
    def _cron_period(cls, value: int) -> int:
        cron_fields(value)
        return value


def cron_fields(interval_s: int) -> tuple[set[int], set[int] | None]:
    """The arq cron ``second`` and ``minute`` sets that fire every ``interval_s`` seconds."""
    if interval_s < 60 and 60 % interval_s == 0:
        return set(range(0, 60, interval_s)), None
    if interval_s % 60 == 0 and 60 % (interval_s // 60) == 0:
        return {0}, set(range(0, 60, interval_s // 60))
    raise ValueError("janitor_interval_s must divide 60, or be minutes that divide 60")


def json_dumps(value: Any) -> bytes:
    """arq's serializer: JSON (exceptions in failed results become their repr)."""
    return json.dumps(value, default=repr, separators=(",", ":")).encode()


def json_loads(data: bytes) -> Any:
    return json.loads(data)


# --- the chores (plain functions of a Redis client: tested without arq) -----------------
async def clean_dead_workers(redis: RedisClient, keys: Keys, cutoff_ms: int) -> list[str]:
    """Remove workers whose last heartbeat is older than ``cutoff_ms``; returns their ids.

    A worker that beats again afterwards re-registers on that beat (``beat`` writes it all).
    Entries of the registry hash that lost their heartbeat score are judged by their own
    ``heartbeat_at_ms``.
    """
    stale: list[str] = await redis.zrangebyscore(keys.workers_seen, "-inf", f"({cutoff_ms}")
    rows: dict[str, str] = await redis.hgetall(keys.workers)  # type: ignore[misc]
    seen: list[str] = await redis.zrange(keys.workers_seen, 0, -1)
    orphans = [w for w, raw in rows.items() if w not in seen and _beat_ms(raw) < cutoff_ms]
    dead = sorted(set(stale) | set(orphans))
    if not dead:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for worker_id in dead:
            pipe.hdel(keys.workers, worker_id)
            pipe.zrem(keys.workers_seen, worker_id)
            model = _model_of(rows.get(worker_id))
            if model is not None:
                pipe.hdel(keys.throughput(model), worker_id)
        await pipe.execute()
    return dead


def _beat_ms(raw: str) -> int:
    try:
        return WorkerInfo.model_validate_json(raw).heartbeat_at_ms
    except ValueError:
        return 0  # unreadable entry: as good as dead


def _model_of(raw: str | None) -> str | None:
    if raw is None:
        return None
    try:
        return WorkerInfo.model_validate_json(raw).model
    except ValueError:
        return None


def stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def successor(value: str) -> str:
    ms, seq = stream_id(value)
    return f"{ms + 1}-0" if seq >= MAX_SEQ else f"{ms}-{seq + 1}"


async def oldest_needed_id(redis: RedisClient, stream: str) -> str | None:
    """The smallest id some consumer group still needs; None: keep everything.

    Per group, an entry is needed if it is pending (delivered, not acknowledged) or not yet
    delivered (after ``last-delivered-id``). Both bounds only move forward, so an id computed
    here stays safe to trim below even while workers keep pulling.
    """
    try:
        groups: list[dict[str, Any]] = await redis.xinfo_groups(stream)
    except ResponseError:
        return None  # no such stream
    if not groups:
        return None  # nobody reads it yet: every entry is undelivered
    floor: tuple[int, int] | None = None
    for group in groups:
        candidates = [successor(str(group["last-delivered-id"]))]
        if int(group["pending"]) > 0:
            summary = await redis.xpending(stream, group["name"])
            if summary["min"] is not None:
                candidates.append(str(summary["min"]))
        low = min(stream_id(c) for c in candidates)
        floor = low if floor is None else min(floor, low)
    assert floor is not None
    return f"{floor[0]}-{floor[1]}"


async def trim_queue(redis: RedisClient, stream: str) -> int:
    """XTRIM MINID below the oldest needed entry; returns how many entries went."""
    minid = await oldest_needed_id(redis, stream)
    if minid is None:
        return 0
    return int(await redis.xtrim(stream, minid=minid, approximate=False))


async def trim_streams(redis: RedisClient, keys: Keys, model: str, dead_maxlen: int) -> int:
    removed = 0
    for queue in keys.queues(model):
        removed += await trim_queue(redis, queue)
    removed += int(await redis.xtrim(keys.dead_letter(model), maxlen=dead_maxlen, approximate=True))
    return removed


async def sweep_leases(store: JobStore, model: str) -> int | None:
    """Fail over expired leases of ``model``; None when this JobStore cannot sweep yet."""
    sweep: Callable[[str], Awaitable[Any]] | None = getattr(store, "sweep_expired_leases", None)
    if sweep is None:
        return None
    result = await sweep(model)
    if isinstance(result, int | float):
        return int(result)
    return len(result) if hasattr(result, "__len__") else 0


async def rollup_stats(
    redis: RedisClient, keys: Keys, models: set[str], ttl_s: float, keep_ms: int
) -> dict[str, dict[str, float]]:
    """Sum live workers' figures per model into ``stats(model)``; returns what it wrote."""
    workers = await live_workers(redis, keys, ttl_s)
    now = await redis_now_ms(redis)
    out: dict[str, dict[str, float]] = {}
    for model in sorted(models | {w.model for w in workers}):
        mine = [w for w in workers if w.model == model]
        out[model] = {
            "workers": len(mine),
            "tokens_per_s": round(sum(w.tokens_per_s for w in mine), 3),
            "capacity_tokens": sum(w.capacity_tokens for w in mine if not w.draining),
            "tokens_in_use": sum(w.tokens_in_use for w in mine),
            "seqs_in_use": sum(w.seqs_in_use for w in mine),
            "updated_ms": now,
        }
    async with redis.pipeline(transaction=False) as pipe:
        for model, figures in out.items():
            pipe.hset(keys.stats(model), mapping=figures)
            pipe.pexpire(keys.stats(model), keep_ms)
        await pipe.execute()
    return out


# --- arq wiring --------------------------------------------------------------------------
@dataclass
class Janitor:
    """What the cron jobs share: settings, a (decoding) Redis client, keys and the store."""

    settings: JanitorSettings
    redis: RedisClient
    keys: Keys
    store: JobStore
    id: str

    async def models(self) -> set[str]:
        workers = await live_workers(self.redis, self.keys, self.settings.worker_ttl_s)
        return await known_models(self.redis, self.keys) | {w.model for w in workers}

    async def record(self, ctx: dict[str, Any], task: str, result: object) -> None:
        """Append the firing to ``janitor_log`` (who ran which firing, and what it did)."""
        fields: dict[Any, Any] = {
            "task": task,
            "job": str(ctx.get("job_id", "")),
            "janitor": self.id,
            "result": json.dumps(result, default=str),
        }
        await self.redis.xadd(
            self.keys.janitor_log, fields, maxlen=JANITOR_LOG_MAXLEN, approximate=True
        )
        log.info("janitor_task", task=task, job=fields["job"], result=result)


def _janitor(ctx: dict[str, Any]) -> Janitor:
    janitor = ctx["janitor"]
    assert isinstance(janitor, Janitor)
    return janitor


async def task_clean_workers(ctx: dict[str, Any]) -> list[str]:
    j = _janitor(ctx)
    age_ms = int(j.settings.dead_worker_factor * j.settings.worker_ttl_s * 1000)
    dead = await clean_dead_workers(j.redis, j.keys, await redis_now_ms(j.redis) - age_ms)
    await j.record(ctx, "clean_workers", dead)
    return dead


async def task_sweep_leases(ctx: dict[str, Any]) -> dict[str, int | None]:
    j = _janitor(ctx)
    swept = {m: await sweep_leases(j.store, m) for m in sorted(await j.models())}
    if any(v is None for v in swept.values()):
        log.warning("lease_sweep_unavailable", reason="JobStore has no sweep_expired_leases")
    await j.record(ctx, "sweep_leases", swept)
    return swept


async def task_trim_streams(ctx: dict[str, Any]) -> dict[str, int]:
    j = _janitor(ctx)
    maxlen = j.settings.dead_letter_maxlen
    trimmed = {m: await trim_streams(j.redis, j.keys, m, maxlen) for m in sorted(await j.models())}
    await j.record(ctx, "trim_streams", trimmed)
    return trimmed


async def task_rollup_stats(ctx: dict[str, Any]) -> dict[str, dict[str, float]]:
    j = _janitor(ctx)
    keep_ms = max(60_000, 10 * j.settings.janitor_interval_s * 1000)
    stats = await rollup_stats(j.redis, j.keys, await j.models(), j.settings.worker_ttl_s, keep_ms)
    await j.record(ctx, "rollup_stats", stats)
    return stats


TASKS = (task_clean_workers, task_sweep_leases, task_trim_streams, task_rollup_stats)


def cron_jobs(interval_s: int) -> list[CronJob]:
    """One unique cron job per chore; a firing's job id is ``cron:<task>:<unix ms>``."""
    keep = max(60, 10 * interval_s)
    timeout = max(30, interval_s)
    second, minute = cron_fields(interval_s)
    return [
        cron(
            t,
            name=f"cron:{t.__name__.removeprefix('task_')}",
            unique=True,
            keep_result=keep,
            timeout=timeout,
            max_tries=1,
            second=second,
            minute=minute,
        )
        for t in TASKS
    ]


def arq_pool(url: str) -> ArqRedis:
    """arq's client from ``shared.redis.connect``, not arq's own ``RedisSettings``: so every
    URL the other processes take works here too (Sentinel with its own credentials and TLS,
    which arq's ``RedisSettings(sentinel=True)`` cannot pass to the sentinels), with the same
    retries across a failover. arq stores bytes: no response decoding."""
    pool = connect(
        url, client_name="slipstream-janitor-arq", decode_responses=False, redis_class=ArqRedis
    )
    pool.job_serializer = json_dumps
    pool.job_deserializer = json_loads
    return pool


def build_worker(settings: JanitorSettings, *, handle_signals: bool = True) -> ArqWorker:
    """The arq worker running the janitor's cron jobs (call inside a running event loop)."""
    keys = Keys(settings.prefix)
    janitor_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    async def startup(ctx: dict[str, Any]) -> None:
        redis = connect(settings.redis_url, client_name="slipstream-janitor")
        store = JobStore(redis, keys, ttl_s=settings.job_log_ttl_s)
        ctx["janitor"] = Janitor(settings, redis, keys, store, janitor_id)
        log.info("janitor_started", janitor=janitor_id, interval_s=settings.janitor_interval_s)

    async def shutdown(ctx: dict[str, Any]) -> None:
        janitor = ctx.get("janitor")
        if isinstance(janitor, Janitor):
            await janitor.redis.aclose()

    return ArqWorker(
        cron_jobs=cron_jobs(settings.janitor_interval_s),
        redis_pool=arq_pool(settings.arq_url),
        queue_name=keys.janitor_queue,
        health_check_key=f"{keys.janitor_queue}:health",
        job_serializer=json_dumps,
        job_deserializer=json_loads,
        on_startup=startup,
        on_shutdown=shutdown,
        handle_signals=handle_signals,
        poll_delay=0.5,
        max_jobs=len(TASKS),
        keep_result=max(60, 10 * settings.janitor_interval_s),
        max_tries=1,
        log_results=False,
    )


async def run_janitor(settings: JanitorSettings) -> None:
    """Run until SIGTERM/SIGINT (arq's own handlers stop it), then close connections."""
    worker = build_worker(settings)
    try:
        with suppress(asyncio.CancelledError):
            await worker.async_run()
    finally:
        # A job still running at SIGTERM was cancelled by arq's own handler, and arq's
        # close() gathers the job tasks without return_exceptions: that cancellation ended
        # the janitor with exit code 1 and skipped the rest of close() (seen in CI, a SIGTERM
        # during a cron firing). Settled here first, the shutdown is clean.
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        worker.tasks.clear()
        await worker.close()


def main(settings: JanitorSettings) -> None:
    from shared.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    asyncio.run(run_janitor(settings))
