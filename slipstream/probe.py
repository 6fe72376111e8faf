"""``slipstream worker-check``: exit 0 when a worker on this host has a fresh heartbeat.

Workers serve no HTTP; their liveness is their heartbeat in the registry. This is the exec
probe of the worker container (Kubernetes readiness/liveness, compose healthcheck): it finds
the registry entry of this host (the pod or container hostname) or of ``--worker-id`` and
checks the age of its last heartbeat. ``--redis-down-ok`` makes an unreachable Redis pass,
for liveness probes that must not restart every worker during a Redis outage.
"""

from __future__ import annotations

import asyncio
import socket

from redis.exceptions import RedisError

from shared.clock import redis_now_ms
from shared.keys import Keys
from shared.models import WorkerInfo
from shared.redis import connect
from shared.settings import CommonSettings


async def check_worker(
    settings: CommonSettings,
    *,
    worker_id: str | None = None,
    host: str | None = None,
    max_age_s: float | None = None,
    redis_down_ok: bool = False,
) -> tuple[bool, str]:
    """(healthy, why): a registry entry of ``worker_id`` (or of ``host``) beat recently."""
    host = host or socket.gethostname()
    max_age_ms = int((max_age_s or settings.worker_ttl_s) * 1000)
    redis = connect(settings.redis_url, socket_timeout=2.0, max_connections=2)
    try:
        rows: dict[str, str] = await asyncio.wait_for(
            redis.hgetall(Keys(settings.prefix).workers),  # type: ignore[arg-type]
            3.0,
        )
        now = await asyncio.wait_for(redis_now_ms(redis), 3.0)  # beats carry Redis's time
    except (RedisError, OSError, TimeoutError) as exc:
        return redis_down_ok, f"redis unreachable: {exc}"
    finally:
        await redis.aclose()
    for raw in rows.values():
        try:
            info = WorkerInfo.model_validate_json(raw)
        except ValueError:
            continue
        if info.id == worker_id or (worker_id is None and info.host == host):
            age = now - info.heartbeat_at_ms
            if age <= max_age_ms:
                return True, f"worker {info.id} beat {age} ms ago"
    target = f"worker {worker_id}" if worker_id else f"a worker on host {host}"
    return False, f"no heartbeat from {target} in the last {max_age_ms} ms"
