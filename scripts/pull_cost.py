"""What warm-state routing costs Redis: server time of one PULL, affinity off vs on.

    .venv/bin/python scripts/pull_cost.py

Starts its own redis-server, advertises N workers' warm sets (each as a real ``WarmPrefixes``
of 64 cached 4 KB prompts, written by the ``Advertiser``), enqueues jobs whose prompts are
warm on one of them, and has a cold worker pull them. Reports Redis's own time per PULL
(``INFO commandstats``: ``evalsha`` usec per call, no network in it), for 4, 32 and 128
advertised workers, against the same queue with affinity off.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.affinity import AffinityPolicy  # noqa: E402
from shared.jobs import JobStore  # noqa: E402
from shared.keys import Keys  # noqa: E402
from shared.prefix import block_hashes  # noqa: E402
from shared.redis import connect  # noqa: E402
from tests.helpers import make_job, start_redis  # noqa: E402
from worker.advertiser import Advertiser  # noqa: E402
from worker.warm import WarmPrefixes  # noqa: E402

KEYS = Keys()
JOBS = 400


def prompt(worker: int, n: int) -> str:
    return f"[worker {worker} conversation {n}] " + "history of a long chat " * 180


async def measure(workers: int, affinity: bool) -> float:
    server = start_redis()
    redis = connect(server.url)
    try:
        for w in range(workers):
            warm = WarmPrefixes(max_blocks=4096)
            for n in range(64):
                warm.add(block_hashes(prompt(w, n)))
            await Advertiser(redis, KEYS, "m", f"w{w}", 600_000).beat(1 << 30, 1 << 20, warm)
        policy = AffinityPolicy(1, 600_000) if affinity else None
        store = JobStore(redis, KEYS, ttl_s=600, affinity=policy)
        for i in range(JOBS):
            await store.enqueue(make_job("m", prompt=prompt(i % workers, i % 64) + " more"))
        await redis.config_resetstat()
        pulls = 0
        while pulls < 4 * JOBS:
            pulls += 1
            result = await store.pull(
                "m", "cold", free_tokens=1 << 30, free_seqs=1 << 20, idle=False,
                lease_ms=600_000, aging_ms={}, max_deliveries=3,
            )  # fmt: skip
            if result.kind == "empty" and result.next_lease_ms > 5_000:
                break
            if result.kind == "empty":
                await asyncio.sleep(0.002)
        stats = await redis.info("commandstats")
        evalsha = stats["cmdstat_evalsha"]
        return float(evalsha["usec"]) / int(evalsha["calls"])
    finally:
        await redis.aclose()
        server.stop()


async def main() -> None:
    print("workers  PULL usec (affinity off)  PULL usec (affinity on)")
    for workers in (4, 32, 128):
        off = await measure(workers, False)
        on = await measure(workers, True)
        print(f"{workers:7d}  {off:24.1f}  {on:23.1f}")


if __name__ == "__main__":
    asyncio.run(main())
