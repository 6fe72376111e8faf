"""Redis faults under load, many randomized trials each: what the clients saw (issue 12).

Four faults, each run ``--trials`` times against one set of real processes (a redis-server,
a gateway and simulator workers, started as the fault suite starts them,
``tests/faults/cluster.py``; lease 0.6 s, heartbeat 0.1 s):

- ``lossy`` (``bench/faults_lossy.py``): the gateway, the workers and a janitor reach Redis
  through ``tests/lossy_proxy.LossyProxy`` while streams run; each trial aims its losses at one
  Lua script (ENQUEUE, PULL, EMIT, RENEW, CANCEL, HANDBACK, RELEASE, SWEEP in turn) and makes
  the traffic that calls it; the reply is lost after Redis ran the script, the connection is
  cut, and redis-py replays it. Lost replies are counted per script.
- ``skew`` (``bench/faults_skew.py``): workers and a deadline-taking gateway whose clocks are
  off by up to ±30 s (libfaketime) beside a correct worker and gateway.
- ``sigstop``: Redis is SIGSTOPped for longer than the clients' socket timeout (10 s), at a
  random moment mid-stream, then SIGCONTed.
- ``restart``: ``kill -9`` of Redis (AOF ``everysec``) while 50 streams run, at a random moment,
  restarted after a random pause.

Per trial: tokens lost and duplicated (SSE ids missing or repeated, and text different from the
simulator's uninterrupted greedy answer), streams that did not complete although nothing asked
them to fail ("wrongly failed"), and the time to recover: from the end of the fault (SIGCONT,
the restart) to each running stream's next token; for ``lossy``, the longest pause between two
tokens of a stream. Target: 0 lost, 0 duplicated, 0 wrongly failed, recovery <= lease + 1 s.

    flock /tmp/slipstream-bench.lock .venv/bin/python -m bench.faults --trials 20 \\
        --out docs/reliability_faults.json --doc docs/reliability.md

``--faults skew lossy`` runs only those; ``--out`` keeps the other faults' rows and trials
already in the file, and ``--doc`` writes the table from all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from bench.faults_base import LEASE_S, Trial, fleet, report, resumed_after, run_streams
from bench.faults_lossy import TARGETS, lossy
from bench.faults_skew import skew
from tests.faults.cluster import Cluster, percentile

__all__ = ["FAULTS", "LEASE_S", "Trial", "lossy", "restart", "sigstop", "skew"]

SOCKET_TIMEOUT_S = 10.0  # shared.redis.connect's default, what the gateway and workers use
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"


async def sigstop(trials: int, streams: int = 10, tokens: int = 40) -> list[Trial]:
    return await redis_fault_trials("sigstop", stop_redis, trials, streams, tokens)


async def redis_fault_trials(
    kind: str,
    fault: Callable[[Cluster, Trial], Awaitable[None]],
    trials: int,
    streams: int,
    tokens: int,
    *,
    aof: bool = False,
) -> list[Trial]:
    """``trials`` rounds of ``streams`` streams on one fleet, ``fault`` striking Redis in each."""
    cluster = Cluster.start(aof=aof)
    out = []
    try:
        async with fleet(cluster.redis.url, cluster) as base:
            for n in range(trials):
                trial = Trial(kind, n, streams)
                strike = functools.partial(fault, cluster, trial)
                records = await run_streams(base, trial, tokens, strike)
                trial.recover_s = resumed_after(records, trial.detail["fault_end"])
                out.append(report(trial))
    finally:
        cluster.stop()
    return out


async def stop_redis(cluster: Cluster, trial: Trial) -> None:
    """SIGSTOP Redis for longer than the clients' socket timeout, at a random moment."""
    await asyncio.sleep(random.uniform(0.0, 0.4))
    length = random.uniform(SOCKET_TIMEOUT_S + 0.5, SOCKET_TIMEOUT_S + 2.0)
    trial.detail["stopped_s"] = round(length, 2)
    cluster.redis.proc.send_signal(signal.SIGSTOP)
    await asyncio.sleep(length)
    cluster.redis.proc.send_signal(signal.SIGCONT)
    trial.detail["fault_end"] = time.monotonic()


async def restart(trials: int, streams: int = 50, tokens: int = 40) -> list[Trial]:
    return await redis_fault_trials("restart", crash_redis, trials, streams, tokens, aof=True)


async def crash_redis(cluster: Cluster, trial: Trial) -> None:
    """``kill -9`` Redis at a random moment; restart it (AOF) after a random pause."""
    await asyncio.sleep(random.uniform(0.0, 0.4))
    down = random.uniform(0.1, 1.0)
    trial.detail["down_s"] = round(down, 2)
    cluster.redis.stop(kill=True)
    await asyncio.sleep(down)
    await asyncio.to_thread(cluster.redis.restart)
    trial.detail["fault_end"] = time.monotonic()


FAULTS: dict[str, Callable[[int], Awaitable[list[Trial]]]] = {
    "lossy": lossy,
    "skew": skew,
    "sigstop": sigstop,
    "restart": restart,
}
TITLES = {
    "lossy": "Lost replies for every script: reply lost after Redis ran it, connection cut "
    "(every 50-250 ms; 3 in 4 the trial's target script), 10 streams",
    "skew": "Clock skew: 2 workers and a deadline gateway each off by up to ±30 s "
    "(libfaketime) beside correct ones, 9 streams + 2 deadline requests",
    "sigstop": "Redis SIGSTOP for 10.5-12 s (> the 10 s socket timeout), 10 streams",
    "restart": "Redis `kill -9` + restart (AOF everysec, down 0.1-1 s), 50 streams",
}


def summary(fault: str, trials: list[Trial]) -> dict[str, Any]:
    recover = [x for t in trials for x in t.recover_s]
    checks: dict[str, int] = {}
    lost: dict[str, int] = {}
    targeted: dict[str, int] = {}
    for t in trials:
        for name, n in t.checks.items():
            checks[name] = checks.get(name, 0) + n
        for name, n in t.lost.items():
            lost[name] = lost.get(name, 0) + n
        if t.target and fault == "lossy":
            targeted[t.target] = targeted.get(t.target, 0) + 1
    return {
        "fault": fault,
        "trials": len(trials),
        "streams": sum(t.streams for t in trials),
        "tokens_lost": sum(t.tokens_lost for t in trials),
        "tokens_duplicated": sum(t.tokens_duplicated for t in trials),
        "text_wrong": sum(t.text_wrong for t in trials),
        "wrongly_failed": sum(t.wrongly_failed for t in trials),
        "client_errors": sum(len(t.errors) for t in trials),
        "recover_p50_s": round(percentile(recover, 0.5), 3),
        "recover_p99_s": round(percentile(recover, 0.99), 3),
        "recover_max_s": round(max(recover, default=0.0), 3),
        "within_target": sum(1 for x in recover if x <= LEASE_S + 1.0),
        "measured": len(recover),
        "replies_lost": int(sum(t.detail.get("replies_lost", 0) for t in trials)),
        "checks": checks,
        "lost_by_call": dict(sorted(lost.items(), key=lambda kv: -kv[1])),
        "trials_by_target": targeted,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| Fault | Trials | Streams | Tokens lost | Duplicated | Text wrong | Wrongly failed "
        "| Recover p50 | p99 | max | ≤ lease + 1 s |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {TITLES[r['fault']]} | {r['trials']} | {r['streams']} | {r['tokens_lost']} "
        f"| {r['tokens_duplicated']} | {r['text_wrong']} | {r['wrongly_failed']} "
        f"| {r['recover_p50_s']:.2f} s | {r['recover_p99_s']:.2f} s | {r['recover_max_s']:.2f} s "
        f"| {r['within_target']} / {r['measured']} |"
        for r in rows
    ]
    extra = [f(r) for r in rows for f in (scripts_table, skew_table) if f(r)]
    return head + "\n".join(lines) + "\n" + "".join("\n" + e for e in extra)


def scripts_table(row: dict[str, Any]) -> str:
    """Lost replies per script (``lossy``): trials aimed at it, replies it lost."""
    if row["fault"] != "lossy" or "trials_by_target" not in row:
        return ""
    lost, aimed = row["lost_by_call"], row["trials_by_target"]
    cells = ", ".join(f"{n} {lost.get(n, 0)} ({aimed.get(n, 0)})" for n in TARGETS)
    others = sum(n for name, n in lost.items() if name not in TARGETS)
    checks = row["checks"]
    return (
        "Lost replies per script (trials aimed at it): "
        + cells
        + f"; other commands: {others}. Cancelled jobs that ended `cancelled`: "
        + f"{checks.get('cancelled', 0)} / "
        + f"{checks.get('cancelled', 0) + checks.get('cancel_not_honoured', 0)}; "
        + f"workers drained: {checks.get('drained', 0)}.\n"
    )


def skew_table(row: dict[str, Any]) -> str:
    """The clock-skew trial's own counts."""
    if row["fault"] != "skew":
        return ""
    c = row["checks"]
    return (
        "Clock skew: leases taken from live workers (`job_fenced`) "
        f"{c.get('leases_taken', 0)}; jobs delivered more than once "
        f"{c.get('deliveries_gt1', 0)} / {c.get('jobs', 0)} "
        f"({c.get('on_skewed_worker', 0)} ran on a skewed worker); live-set samples missing a "
        f"running worker {c.get('workers_seen_dead', 0)}; deadlines honoured "
        f"{c.get('deadline_checks', 0) - c.get('deadline_misses', 0)} / "
        f"{c.get('deadline_checks', 0)}.\n"
    )


def write_doc(path: str, table: str) -> None:
    """Replace what lies between the markers in ``path`` with ``table``."""
    with open(path) as f:
        text = f.read()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    with open(path, "w") as f:
        f.write(text[:start] + "\n" + table + text[end:])


async def main_async(args: argparse.Namespace) -> None:
    random.seed(args.seed)
    kept = load(args.out)
    meta = {"seed": args.seed, "commit": commit(), "lease_s": LEASE_S, "trials": args.trials}
    for fault in args.faults:
        done = await FAULTS[fault](args.trials)
        kept["runs"][fault] = [asdict(t) for t in done]
        kept["summary"][fault] = summary(fault, done) | {"run": meta}
        print(json.dumps(kept["summary"][fault]), flush=True)
    rows = [kept["summary"][f] for f in FAULTS if f in kept["summary"]]
    table = markdown(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"lease_s": LEASE_S, "summary": rows, "runs": kept["runs"]}, out, indent=1)
    if args.doc:
        write_doc(args.doc, table)


def load(path: str) -> dict[str, dict[str, Any]]:
    """The faults already in ``path`` (by name), so a run of some keeps the others; a file
    from before per-fault run notes keeps its top-level seed and trials on each row."""
    if not path or not os.path.exists(path):
        return {"summary": {}, "runs": {}}
    with open(path) as f:
        old = json.load(f)
    default = {k: old[k] for k in ("seed", "trials", "lease_s") if k in old}
    summary = {r["fault"]: {"run": default} | r for r in old.get("summary", [])}
    return {"summary": summary, "runs": dict(old.get("runs", {}))}


def commit() -> str:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], timeout=30).returncode
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--faults", nargs="+", choices=list(FAULTS), default=list(FAULTS))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("FAULTS_SEED", "12")))
    parser.add_argument("--out", default="", help="write every trial as JSON here")
    parser.add_argument("--doc", default="", help="put the table between the markers here")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
