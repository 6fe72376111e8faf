"""The ceiling of one Redis shard: how many jobs/s and tokens/s one model's traffic can push
through one Redis core.

Every key of a model carries the hash tag ``{model}`` (shared/keys.py), so a model's whole
traffic (ENQUEUE, PULL, EMIT and its publish, RENEW, the gateways' subscriptions and log
reads) lands on one shard: one redis-server process, one core for commands. A standalone
redis-server is therefore a faithful stand-in for one shard. The load is the product's own
code (``bench.shard_load``: ``Dispatch``, ``PubSubMultiplexer``, ``JobStore``,
``EmitBatcher``, ``Registry``, ``Advertiser``), several client processes of it.

This machine has 2 cores, shared by Redis and the load, so the Python clients saturate before
Redis does. The ceiling is therefore computed from Redis's own CPU per job, not from the
throughput reached: over a clean window, Redis's main-thread CPU (``INFO cpu``, user + sys:
commands, socket I/O, pub/sub delivery, key expiry, everything the core does) divided by the
jobs finished in it is the all-in cost of a job; ``1e6 / µs per job`` is the jobs/s one core
sustains at that mix. Two job lengths (e.g. 64 and 256 tokens) give the cost of one more EMIT
batch (the slope) and of the rest of a job (the intercept), so any mix can be sized. A second,
short window with ``SLOWLOG`` at 0 µs breaks command time down by script (``INFO
commandstats`` lumps every script under ``evalsha``); the rest of the all-in cost is I/O and
the event loop. The reached throughput and Redis's utilisation are reported too, labelled as
what they are.

    flock /tmp/slipstream-bench.lock .venv/bin/python -m bench.shard_ceiling \\
        --out docs/shard_ceiling.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from bench import shard_slowlog
from bench.shard_load import Spec, batches_per_job, load_process
from shared import scripts
from shared.redis import connect
from tests.helpers import start_redis


@dataclass(frozen=True, slots=True)
class Load:
    """The load generator's shape (the same for every run)."""

    procs: int = 2
    streams: int = 64  # per process
    workers: int = 4  # per process
    slots: int = 16  # per worker
    batch_tokens: int = 6
    prompt_bytes: int = 1024
    ttl_s: int = 5
    warmup_s: float = 8.0
    seconds: float = 20.0
    slowlog_s: float = 1.5


@dataclass(frozen=True, slots=True)
class Run:
    tokens: int
    subscribers: bool = True
    aof: bool = False
    replica: bool = False  # a replica attached: the master also feeds its replication stream

    @property
    def setting(self) -> str:
        subs = "subscribed" if self.subscribers else "no-subscribers"
        return subs + ("-aof" if self.aof else "") + ("-replica" if self.replica else "")

    @property
    def name(self) -> str:
        return f"{self.tokens}tok-{self.setting}"


def publish_command() -> str:
    """What ``EMIT`` publishes with, as the scripts read now (the lead moves it to SPUBLISH)."""
    return "SPUBLISH" if "'SPUBLISH'" in scripts.EMIT.source else "PUBLISH"


def ceiling(us_per_job: float) -> float:
    """Jobs/s one core sustains when each job costs ``us_per_job`` µs of it."""
    return 1e6 / us_per_job if us_per_job > 0 else 0.0


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """``(fixed, per_batch)`` µs of the line ``µs per job = fixed + batches * per_batch``
    through (batches per job, µs per job) points (least squares; two points: the line)."""
    n = len(points)
    mx = sum(b for b, _ in points) / n
    my = sum(u for _, u in points) / n
    sxx = sum((b - mx) ** 2 for b, _ in points)
    slope = sum((b - mx) * (u - my) for b, u in points) / sxx if sxx else 0.0
    return my - slope * mx, slope


def sizing(fixed: float, per_batch: float, tokens: int, batch_tokens: int) -> dict[str, float]:
    """One shard's ceiling at a mix, from the fitted costs."""
    batches = batches_per_job(tokens, batch_tokens)
    us = fixed + batches * per_batch
    jobs = ceiling(us)
    return {
        "tokens_per_job": tokens,
        "tokens_per_batch": batch_tokens,
        "batches_per_job": batches,
        "redis_us_per_job": round(us, 1),
        "jobs_per_s": round(jobs),
        "tokens_per_s": round(jobs * tokens),
        "batches_per_s": round(jobs * batches),
    }


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


async def snapshot(redis: Any, array: Any, pids: list[int]) -> dict[str, Any]:
    """Redis's CPU and command counters, the load's counters and the machine's CPU, now."""
    cpu = await redis.info("cpu")
    stats = await redis.info("commandstats")
    replication = await redis.info("replication")
    busy, total = machine_jiffies()
    return {
        "t": time.monotonic(),
        "main": cpu["used_cpu_user_main_thread"] + cpu["used_cpu_sys_main_thread"],
        "main_sys": cpu["used_cpu_sys_main_thread"],
        "all": cpu["used_cpu_user"] + cpu["used_cpu_sys"],
        "children": cpu["used_cpu_user_children"] + cpu["used_cpu_sys_children"],
        "cmd": {k[8:]: (v["calls"], v["usec"]) for k, v in stats.items()},
        "counters": list(array[:]),
        "busy": busy,
        "total": total,
        "load_cpu": cpu_of(pids),
        "replicas": int(replication.get("connected_slaves", 0)),
    }


def window(a: dict[str, Any], b: dict[str, Any], run: Run) -> dict[str, Any]:
    """The clean window's figures."""
    secs = b["t"] - a["t"]
    jobs = b["counters"][0] - a["counters"][0]
    batches = b["counters"][1] - a["counters"][1]
    main_us = (b["main"] - a["main"]) * 1e6
    evalsha = [
        b["cmd"].get("evalsha", (0, 0))[i] - a["cmd"].get("evalsha", (0, 0))[i] for i in (0, 1)
    ]
    us_job = main_us / jobs if jobs else 0.0
    return {
        "seconds": round(secs, 2),
        "jobs": jobs,
        "batches": batches,
        "fenced_off": b["counters"][3] - a["counters"][3],
        "replicas_connected": b["replicas"],
        "achieved_jobs_per_s": round(jobs / secs, 1),
        "achieved_tokens_per_s": round(jobs * run.tokens / secs),
        "achieved_batches_per_s": round(batches / secs),
        "redis_main_thread_cpu_util": round(main_us / 1e6 / secs, 3),
        "redis_main_thread_sys_share": round((b["main_sys"] - a["main_sys"]) * 1e6 / main_us, 3)
        if main_us
        else 0.0,
        "redis_all_threads_cpu_util": round((b["all"] - a["all"]) / secs, 3),
        "redis_children_cpu_util": round((b["children"] - a["children"]) / secs, 3),
        "load_processes_cpu_util": round((b["load_cpu"] - a["load_cpu"]) / secs, 3),
        "machine_busy": round((b["busy"] - a["busy"]) / max(1, b["total"] - a["total"]), 3),
        "redis_us_per_job": round(us_job, 1),
        "evalsha_calls_per_job": round(evalsha[0] / jobs, 2) if jobs else 0.0,
        "evalsha_us_per_job": round(evalsha[1] / jobs, 1) if jobs else 0.0,
        "evalsha_us_per_call": round(evalsha[1] / evalsha[0], 3) if evalsha[0] else 0.0,
        "ceiling_jobs_per_s": round(ceiling(us_job)),
        "ceiling_tokens_per_s": round(ceiling(us_job) * run.tokens),
        "ceiling_batches_per_s": round(ceiling(us_job) * batches / jobs) if jobs else 0,
    }


async def calibrate(url: str) -> float:
    redis = connect(url)
    try:
        return await shard_slowlog.calibrate(redis)
    finally:
        await redis.aclose()


async def measure(
    url: str, array: Any, pids: list[int], run: Run, load: Load, c: float
) -> dict[str, Any]:
    """The clean window (CPU, counters), then the slowlog window (command times)."""
    redis = connect(url)
    try:
        for _ in range(600):  # the processes start (imports, connections): up to 60 s
            if array[0] > 0:
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("no job finished in 60 s: the load is not running")
        await asyncio.sleep(load.warmup_s)
        a = await snapshot(redis, array, pids)
        await asyncio.sleep(load.seconds)
        b = await snapshot(redis, array, pids)
        figures = window(a, b, run)
        slow = await shard_slowlog.window(redis, array, load.slowlog_s)
        figures["slowlog"] = breakdown = shard_slowlog.breakdown(slow, c)
        io_us = figures["redis_us_per_job"] - breakdown["command_us_per_job"]
        figures["io_and_loop_us_per_job"] = round(io_us, 1)  # an estimate (see docstring)
        return figures
    finally:
        await redis.aclose()


def measure_run(run: Run, load: Load) -> dict[str, Any]:
    """One run: a fresh redis-server, the load processes, the two windows."""
    server = start_redis(aof=run.aof)
    replica = start_redis("--replicaof", "127.0.0.1", str(server.port)) if run.replica else None
    ctx = multiprocessing.get_context("spawn")
    array = ctx.Array("q", 4)
    procs = []
    try:
        c = asyncio.run(calibrate(server.url))
        for i in range(load.procs):
            spec = Spec(
                url=server.url, tokens=run.tokens, batch_tokens=load.batch_tokens,
                subscribers=run.subscribers, streams=load.streams, workers=load.workers,
                slots=load.slots, prompt_bytes=load.prompt_bytes, ttl_s=load.ttl_s, index=i,
            )  # fmt: skip
            p = ctx.Process(target=load_process, args=(spec, array, load.procs), daemon=True)
            p.start()
            procs.append(p)
        pids = [p.pid for p in procs if p.pid is not None]
        figures = asyncio.run(measure(server.url, array, pids, run, load, c))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        if replica is not None:
            replica.stop()
        server.stop()
    return {"run": run.name, "setting": run.setting, **asdict(run), **figures}


def summary(results: list[dict[str, Any]], load: Load, tokens: list[int]) -> dict[str, Any]:
    """Per setting (subscribers, AOF, replica): the median µs per job of each job length's
    runs, the line through them (fixed + per batch) and the ceiling at each mix."""
    out: dict[str, Any] = {}
    for setting in dict.fromkeys(r["setting"] for r in results):
        rows = [r for r in results if r["setting"] == setting]
        lengths = sorted({r["tokens"] for r in rows})
        if len(lengths) < 2:
            continue
        per_job = {
            t: statistics.median(r["redis_us_per_job"] for r in rows if r["tokens"] == t)
            for t in lengths
        }
        points = [(batches_per_job(t, load.batch_tokens), us) for t, us in per_job.items()]
        fixed, per_batch = fit(points)
        out[setting] = {
            "median_us_per_job": {str(t): round(us, 1) for t, us in per_job.items()},
            "runs_util_and_us_per_job": [
                (r["tokens"], r["redis_main_thread_cpu_util"], r["redis_us_per_job"]) for r in rows
            ],
            "fixed_us_per_job": round(fixed, 1),
            "us_per_batch": round(per_batch, 2),
            "mixes": [sizing(fixed, per_batch, t, load.batch_tokens) for t in tokens],
        }
    return out


def code_state() -> dict[str, Any]:
    """The commit measured, and whether the job code paths differed from it (uncommitted)."""
    paths = ["shared/lua", "shared/jobs.py", "shared/scripts.py", "gateway", "worker"]
    git = ["git", "-C", str(Path(__file__).resolve().parent.parent)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", *paths], capture_output=True, text=True)
    return {"commit": head.stdout.strip(), "uncommitted": dirty.stdout.split("\n")[:40]}


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu_model": next(
            (
                line.split(":", 1)[1].strip()
                for line in open("/proc/cpuinfo")
                if "model name" in line
            ),
            platform.processor(),
        ),
        "kernel": platform.release(),
        "loadavg_before": os.getloadavg(),
        "redis_server": os.popen("redis-server --version").read().strip(),
    }


def parse_args() -> tuple[argparse.Namespace, Load]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--tokens", default="64,256", help="token events per job, one run each")
    ap.add_argument("--size", default="64,256,1024", help="mixes to size the ceiling for")
    ap.add_argument("--no-subscribers", action="store_true", help="also run without listeners")
    ap.add_argument("--aof", action="store_true", help="also run with appendonly everysec")
    ap.add_argument("--replica", action="store_true", help="also run with one replica attached")
    ap.add_argument("--reps", type=int, default=3, help="runs of each setting (median taken)")
    ap.add_argument("--out", type=Path, default=Path("docs/shard_ceiling.json"))
    for name, default in asdict(Load()).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = ap.parse_args()
    load = replace(Load(), **{k: getattr(args, k) for k in asdict(Load())})
    return args, load


def main() -> None:
    args, load = parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    runs = [Run(t) for t in tokens]
    if args.no_subscribers:
        runs += [Run(t, subscribers=False) for t in tokens]
    if args.aof:
        runs += [Run(t, aof=True) for t in tokens]
    if args.replica:
        runs += [Run(t, replica=True) for t in tokens]
    host = machine()
    results = []
    for run in [r for _ in range(args.reps) for r in runs]:  # interleaved: drift hits all
        result = measure_run(run, load)
        print(f"{run.name}: {json.dumps({k: v for k, v in result.items() if k != 'slowlog'})}")
        results.append(result)
    report = {
        "what": "one Redis shard's ceiling: Redis main-thread CPU per job of one model's traffic",
        "publish": publish_command(),
        "code": code_state(),
        "machine": host,
        "load": asdict(load),
        "summary": summary(results, load, [int(t) for t in args.size.split(",")]),
        "runs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
