"""Redis's command time per script, from ``SLOWLOG`` at 0 µs (``bench.shard_ceiling``).

``INFO commandstats`` lumps every script under ``evalsha``; the slowlog names each call (the
script's SHA1, and EMIT's ``terminal`` argument splits the job's last batch from the others).
Redis 7 also logs the commands a script runs (client ``?:0``, just before the script's own
entry): they are counted in their script, not again. Logging them happens inside the script,
so a script's logged time includes the slowlog's upkeep of its inner commands: that cost per
inner command is calibrated on the same server before the load starts and taken off.

The times are wall-clock µs inside Redis: on a machine whose cores are shared, a call the
kernel preempted shows the preemption too. The median per call is therefore the figure used
(the mean is kept beside it): the breakdown says where a job's time goes; the ceiling itself
comes from Redis's CPU (``INFO cpu``), which preemption does not inflate.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

from shared import scripts

SCRIPT_NAMES = {s.sha: s.name for s in scripts.SCRIPTS}
TERMINAL_ARG = 12  # EVALSHA sha numkeys, EMIT's 3 keys, then its ARGV: ``terminal`` is 7th
INNER = "?:0"  # the client address Redis logs for a command a script ran
CALIBRATION = "for i = 1, 100 do redis.call('HGET', KEYS[1], 'f') end return 1"


def label(args: list[Any]) -> str:
    """A SLOWLOG entry's name: the command, or the script an EVALSHA ran."""
    name = str(args[0]).upper()
    if name != "EVALSHA" or len(args) < 2:
        return name
    script = SCRIPT_NAMES.get(str(args[1]), "EVALSHA?")
    if script == "EMIT" and len(args) > TERMINAL_ARG and args[TERMINAL_ARG]:
        return "EMIT (terminal)"
    return script


async def _script_us(redis: Any, sha: str, calls: int) -> float:
    await redis.config_resetstat()
    for _ in range(calls):
        await redis.evalsha(sha, 1, "calibration")
    stats = await redis.info("commandstats")
    return float(stats["cmdstat_evalsha"]["usec"]) / calls


async def calibrate(redis: Any, calls: int = 300) -> float:
    """µs the slowlog adds to a script per inner command it logs (a script of 100 ``HGET``
    timed with the slowlog off and at 0 µs; the smaller of two tries each)."""
    sha = await redis.script_load(CALIBRATION)
    await redis.config_set("slowlog-log-slower-than", -1)
    off = min([await _script_us(redis, sha, calls) for _ in range(2)])
    await redis.config_set("slowlog-log-slower-than", 0)
    on = min([await _script_us(redis, sha, calls) for _ in range(2)])
    await redis.config_set("slowlog-log-slower-than", -1)
    await redis.slowlog_reset()
    await redis.config_resetstat()
    return max(0.0, (on - off) / 100)


async def window(redis: Any, array: Any, seconds: float) -> dict[str, Any]:
    """Every command logged over ``seconds``, oldest first, and the jobs and batches the
    load finished meanwhile."""
    await redis.config_set("slowlog-max-len", 1_000_000)
    await redis.slowlog_reset()
    before = list(array[:])
    await redis.config_set("slowlog-log-slower-than", 0)
    await asyncio.sleep(seconds)
    await redis.config_set("slowlog-log-slower-than", -1)
    after = list(array[:])
    entries = await redis.execute_command("SLOWLOG", "GET", -1)
    await redis.slowlog_reset()
    return {
        "jobs": after[0] - before[0],
        "batches": after[1] - before[1],
        "entries": sorted(entries, key=lambda e: int(e[0])),
    }


def per_call(entries: list[Any], c: float) -> dict[str, list[float]]:
    """Each top-level call's time by name, the slowlog's upkeep of its inner calls taken off."""
    times: dict[str, list[float]] = {}
    inner = 0
    for entry in entries:
        if entry[4] == INNER:
            inner += 1
            continue
        name = label(entry[3])
        nested = inner if str(entry[3][0]).upper() == "EVALSHA" else 0
        times.setdefault(name, []).append(int(entry[2]) - nested * c)
        inner = 0
    times.pop("CONFIG", None)
    times.pop("SLOWLOG", None)
    return times


def breakdown(slow: dict[str, Any], c: float) -> dict[str, Any]:
    """Per top-level command or script: calls per job, median and mean µs per call, and the
    median µs per job (calls per job x median)."""
    jobs = max(1, slow["jobs"])
    rows = []
    for name, times in per_call(slow["entries"], c).items():
        median = statistics.median(times)
        rows.append(
            (
                name,
                {
                    "calls_per_job": round(len(times) / jobs, 3),
                    "median_us_per_call": round(median, 2),
                    "mean_us_per_call": round(statistics.fmean(times), 2),
                    "median_us_per_job": round(median * len(times) / jobs, 2),
                },
            )
        )
    rows.sort(key=lambda row: -row[1]["median_us_per_job"])
    return {
        "jobs": slow["jobs"],
        "batches": slow["batches"],
        "slowlog_us_per_inner_command": round(c, 3),
        "commands": dict(rows),
        "command_us_per_job": round(sum(r["median_us_per_job"] for _, r in rows), 1),
    }
