"""``slipstream status``: what Redis says about queues and workers, as a readable table."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from redis.exceptions import ResponseError

from shared.fleet import known_models, live_workers
from shared.keys import CONSUMER_GROUP, Keys
from shared.models import Priority, WorkerInfo
from shared.redis import RedisClient, connect
from shared.settings import CommonSettings


@dataclass(frozen=True, slots=True)
class QueueRow:
    model: str
    priority: Priority
    length: int
    pending: int
    lag: int


async def queue_rows(redis: RedisClient, keys: Keys, models: set[str]) -> list[QueueRow]:
    rows: list[QueueRow] = []
    for model in sorted(models):
        for priority in Priority.ordered():
            key = keys.queue(model, priority)
            length = int(await redis.xlen(key))
            pending = lag = 0
            try:
                for group in await redis.xinfo_groups(key):
                    if group["name"] == CONSUMER_GROUP:
                        pending = int(group["pending"])
                        lag = int(group.get("lag") or 0)
            except ResponseError:
                pass
            rows.append(QueueRow(model, priority, length, pending, lag))
    return rows


def render(rows: list[QueueRow], workers: list[WorkerInfo]) -> str:
    lines = [f"{'MODEL':<24} {'PRIORITY':<8} {'LENGTH':>7} {'WAITING':>8} {'RUNNING':>8}"]
    for r in rows:
        lines.append(f"{r.model:<24} {r.priority.value:<8} {r.length:>7} {r.lag:>8} {r.pending:>8}")
    lines.append("")
    lines.append(
        f"{'WORKER':<36} {'MODEL':<20} {'ENGINE':<7} {'SEQS':>7} {'TOKENS IN USE':>17} "
        f"{'TOK/S':>7} STATE"
    )
    for w in sorted(workers, key=lambda w: w.id):
        state = "draining" if w.draining else ("healthy" if w.healthy else "unhealthy")
        lines.append(
            f"{w.id:<36} {w.model:<20} {w.engine:<7} {w.seqs_in_use:>3}/{w.max_seqs:<3} "
            f"{w.tokens_in_use:>8}/{w.capacity_tokens:<8} {w.tokens_per_s:>7.1f} {state}"
        )
    if not workers:
        lines.append("(no live workers)")
    return "\n".join(lines)


async def snapshot(settings: CommonSettings) -> str:
    redis = connect(settings.redis_url, client_name="slipstream-status")
    try:
        keys = Keys(settings.prefix)
        workers = await live_workers(redis, keys, settings.worker_ttl_s)
        models = await known_models(redis, keys) | {w.model for w in workers}
        return render(await queue_rows(redis, keys, models), workers)
    finally:
        await redis.aclose()


def show_status(watch: float) -> None:
    settings = CommonSettings()
    while True:
        text = asyncio.run(snapshot(settings))
        if watch <= 0:
            print(text)
            return
        print("\x1b[2J\x1b[H" + time.strftime("%H:%M:%S") + "\n" + text, flush=True)
        time.sleep(watch)
