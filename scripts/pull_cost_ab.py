"""PULL before and after the move to ``shared/lua/pull.lua``, paired: Redis's own time per call.

    flock /tmp/slipstream-bench.lock .venv/bin/python scripts/pull_cost_ab.py [--before 7d89f13]

Two redis-servers get the same advertised warm sets (as ``scripts/pull_cost.py``: 4, 32, 128
workers, 64 cached 4 KB prompts each) and the same 400 jobs; a cold worker pulls from both in
lockstep: on A the ``PULL`` of revision ``--before`` (``shared/lua_pull.py``, JSON options,
read with ``git show``), on B today's (``JobStore.pull``). Machine noise hits both alike.
Prints each server's ``evalsha`` usec per call and how many replies only one side gave (the
claims, as job and outcome, and the other replies, counted over the run, order aside: steals
of reservations that ended in the same ms may come in another order on the two servers, whose
clocks differ by the lockstep's lag).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.affinity import AffinityPolicy  # noqa: E402
from shared.jobs import JobStore  # noqa: E402
from shared.keys import CONSUMER_GROUP, Keys  # noqa: E402
from shared.prefix import block_hashes  # noqa: E402
from shared.redis import connect  # noqa: E402
from tests.helpers import make_job, start_redis  # noqa: E402
from worker.advertiser import Advertiser  # noqa: E402
from worker.warm import WarmPrefixes  # noqa: E402

KEYS, JOBS = Keys(), 400
PULL_ARGS: dict[str, Any] = {"free_tokens": 1 << 30, "free_seqs": 1 << 20, "idle": False}
PULL_ARGS |= {"lease_ms": 600_000, "aging_ms": {}, "max_deliveries": 3}


def old_pull_source(rev: str) -> str:
    def show(path: str) -> str:
        return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout  # fmt: skip

    names: dict[str, Any] = {}
    exec(show("shared/lua.py"), names)
    exec(show("shared/lua_pull.py").replace("from shared.lua import _HELPERS", ""), names)
    return str(names["PULL"])


def prompt(worker: int, n: int) -> str:
    return f"[worker {worker} conversation {n}] " + "history of a long chat " * 180


async def old_pull(script: Any) -> list[Any]:
    options = {"group": CONSUMER_GROUP, "consumer": "cold", "free": 1 << 30, "seqs": 1 << 20,
               "idle": False, "prefix": KEYS.model_prefix("m"), "lease": 600_000,
               "ttl": 600_000, "max_deliveries": 3, "aging": [0, 0, 0], "worker_ttl": 5000,
               "pull": uuid.uuid4().hex, "caps": 0}  # fmt: skip
    keys = [*KEYS.queues("m"), KEYS.wake("m")]
    reply: list[Any] = await script(keys=keys, args=[json.dumps(options)])
    return reply


async def run(source: str, workers: int, affinity: bool) -> tuple[float, float, int]:
    servers = [start_redis(), start_redis()]
    rs = [connect(s.url) for s in servers]
    try:
        policy = AffinityPolicy(1, 600_000) if affinity else None
        stores = [JobStore(r, KEYS, ttl_s=600, affinity=policy) for r in rs]
        for r in rs:
            for w in range(workers):
                warm = WarmPrefixes(max_blocks=4096)
                for n in range(64):
                    warm.add(block_hashes(prompt(w, n)))
                await Advertiser(r, KEYS, "m", f"w{w}", 600_000).beat(1 << 30, 1 << 20, warm)
        for i in range(JOBS):
            job = make_job("m", prompt=prompt(i % workers, i % 64) + " more")
            for store in stores:
                await store.enqueue(job)
        old = rs[0].register_script(source)
        for r in rs:
            await r.config_resetstat()
        seen: list[Counter[Any]] = [Counter(), Counter()]
        for _ in range(4 * JOBS):
            a, b = await old_pull(old), await stores[1].pull("m", "cold", **PULL_ARGS)
            seen[0][(a[1], a[6]) if a[0] == "job" else a[0]] += 1
            seen[1][(b.claimed.job.id, b.outcome) if b.claimed else b.kind] += 1
            if b.kind == "empty" and b.next_lease_ms > 5_000:
                break
            if b.kind == "empty":
                await asyncio.sleep(0.002)
        usec = []
        for r in rs:
            stats = (await r.info("commandstats"))["cmdstat_evalsha"]
            usec.append(float(stats["usec"]) / int(stats["calls"]))
        return usec[0], usec[1], sum(((seen[0] - seen[1]) + (seen[1] - seen[0])).values())
    finally:
        for r in rs:
            await r.aclose()
        for s in servers:
            s.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="7d89f13")
    parser.add_argument("--rounds", type=int, default=2)
    source = old_pull_source(parser.parse_args().before)
    print("workers  affinity  PULL usec before  PULL usec after  replies on one side only")
    for _ in range(parser.parse_args().rounds):
        for workers in (4, 32, 128):
            for affinity in (False, True):
                before, after, differ = await run(source, workers, affinity)
                print(f"{workers:7d}  {affinity!s:8}  {before:16.1f}  {after:15.1f}  {differ:23d}")


if __name__ == "__main__":
    asyncio.run(main())
