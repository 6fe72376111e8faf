"""Redis faults under load, many randomized trials each: what the clients saw (issue 12).

Three faults, each run ``--trials`` times against one set of real processes (a redis-server,
a gateway and two simulator workers, started as the fault suite starts them,
``tests/faults/cluster.py``; lease 0.6 s, heartbeat 0.1 s):

- ``lossy``: the gateway and the workers reach Redis through ``tests/lossy_proxy.LossyProxy``
  while streams run; at random moments the reply to the next script call (``EVALSHA``) or the
  next command of any kind is lost after Redis ran it, and the connection is cut (redis-py
  replays it).
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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from tests.faults.cluster import (
    FAST_LEASES,
    Cluster,
    StreamRecord,
    percentile,
    stream_completion,
    wait_frames,
)
from tests.lossy_proxy import LossyProxy
from worker.engines.sim import greedy_text

LEASE_S = float(FAST_LEASES["SLIPSTREAM_LEASE_S"])
SOCKET_TIMEOUT_S = 10.0  # shared.redis.connect's default, what the gateway and workers use
SIM = ("--max-seqs", "32", "--sim-ttft-ms", "5", "--sim-tokens-per-s", "40")
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"


@dataclass
class Trial:
    """One trial of one fault, as the clients saw it."""

    fault: str
    trial: int
    streams: int
    detail: dict[str, float] = field(default_factory=dict)  # the fault's random parameters
    completed: int = 0
    wrongly_failed: int = 0  # did not end with exactly one finish and [DONE]
    text_wrong: int = 0  # text differs from the uninterrupted greedy answer
    tokens_lost: int = 0
    tokens_duplicated: int = 0
    recover_s: list[float] = field(default_factory=list)  # per stream
    errors: list[str] = field(default_factory=list)


def judge(trial: Trial, prompts: list[str], records: list[StreamRecord], tokens: int) -> None:
    for prompt, record in zip(prompts, records, strict=True):
        ids = record.ids()
        if ids:
            trial.tokens_lost += len(set(range(1, max(ids) + 1)) - set(ids))
            trial.tokens_duplicated += len(ids) - len(set(ids))
        done = bool(record.frames) and record.frames[-1][1] == "[DONE]"
        ok = done and len(record.terminals()) == 1 and "error" not in record.terminals()[0]
        trial.completed += int(ok)
        trial.wrongly_failed += int(not ok)
        trial.text_wrong += int(record.text() != greedy_text(prompt, tokens))


def resumed_after(records: list[StreamRecord], moment: float) -> list[float]:
    """Per stream still running at ``moment``: seconds from it to the stream's next token."""
    out = []
    for record in records:
        times = [t for _, data, t in record.frames if data.startswith("{")]
        if times and times[0] < moment and times[-1] > moment:
            out.append(min(t for t in times if t > moment) - moment)
    return out


async def run_streams(
    base: str,
    trial: Trial,
    tokens: int,
    fault: Callable[[], Awaitable[None]],
) -> list[StreamRecord]:
    """``trial.streams`` streams; ``fault`` runs once every stream has its first token."""
    tag = f"{trial.fault} {trial.trial} {random.random():.6f}"
    prompts = [f"{tag} {i}" for i in range(trial.streams)]
    records = [StreamRecord() for _ in prompts]
    tasks = [
        asyncio.create_task(stream_completion(base, p, tokens, r, timeout=90))
        for p, r in zip(prompts, records, strict=True)
    ]
    try:
        await asyncio.gather(*(wait_frames(r, 2, timeout=60) for r in records))
        await fault()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
    finally:
        for task in tasks:
            task.cancel()
    trial.errors += [repr(r)[:200] for r in results if isinstance(r, BaseException)]
    judge(trial, prompts, records, tokens)
    return records


@contextlib.asynccontextmanager
async def fleet(redis_url: str, cluster: Cluster) -> AsyncIterator[str]:
    """A gateway and two workers on ``redis_url``; yields the gateway's base URL."""
    cluster.env["REDIS_URL"] = redis_url
    gateway = cluster.gateway()
    cluster.worker("a", *SIM)
    cluster.worker("b", *SIM)
    await cluster.wait_workers(2)
    yield f"http://127.0.0.1:{gateway.port}"


async def lossy(trials: int, streams: int = 10, tokens: int = 40) -> list[Trial]:
    cluster = Cluster.start()
    proxy = await LossyProxy(cluster.redis.port).start()
    out = []
    try:
        async with fleet(proxy.url, cluster) as base:
            for n in range(trials):
                trial = Trial("lossy", n, streams)
                stop = asyncio.Event()
                losing: list[asyncio.Task[None]] = []
                lose = functools.partial(start_losses, proxy, stop, losing)
                before = len(proxy.lost)
                try:
                    records = await run_streams(base, trial, tokens, lose)
                finally:
                    stop.set()
                    await asyncio.gather(*losing)
                trial.detail["replies_lost"] = len(proxy.lost) - before
                trial.recover_s = [r.largest_gap_s() for r in records]
                out.append(report(trial))
    finally:
        cluster.stop()  # first: the processes' connections end, so the proxy's pumps do too
        await asyncio.sleep(0.2)
        await proxy.close()
    return out


async def start_losses(
    proxy: LossyProxy, stop: asyncio.Event, tasks: list[asyncio.Task[None]]
) -> None:
    tasks.append(asyncio.create_task(losses(proxy, stop)))


async def losses(proxy: LossyProxy, stop: asyncio.Event) -> None:
    """Lose a reply every 50-250 ms until ``stop``: a script call's (3 in 4) or any command's.
    (A loss armed when the trial ends happens early in the next one and counts there.)"""
    while not stop.is_set():
        if not proxy.armed:
            proxy.arm(b"EVALSHA" if random.random() < 0.75 else b"\r\n")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), random.uniform(0.05, 0.25))


async def sigstop(trials: int, streams: int = 10, tokens: int = 40) -> list[Trial]:
    cluster = Cluster.start()
    out = []
    try:
        async with fleet(cluster.redis.url, cluster) as base:
            for n in range(trials):
                trial = Trial("sigstop", n, streams)
                pause = functools.partial(stop_redis, cluster, trial)
                records = await run_streams(base, trial, tokens, pause)
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
    cluster = Cluster.start(aof=True)
    out = []
    try:
        async with fleet(cluster.redis.url, cluster) as base:
            for n in range(trials):
                trial = Trial("restart", n, streams)
                crash = functools.partial(crash_redis, cluster, trial)
                records = await run_streams(base, trial, tokens, crash)
                trial.recover_s = resumed_after(records, trial.detail["fault_end"])
                out.append(report(trial))
    finally:
        cluster.stop()
    return out


async def crash_redis(cluster: Cluster, trial: Trial) -> None:
    """``kill -9`` Redis at a random moment; restart it (AOF) after a random pause."""
    await asyncio.sleep(random.uniform(0.0, 0.4))
    down = random.uniform(0.1, 1.0)
    trial.detail["down_s"] = round(down, 2)
    cluster.redis.stop(kill=True)
    await asyncio.sleep(down)
    await asyncio.to_thread(cluster.redis.restart)
    trial.detail["fault_end"] = time.monotonic()


def report(trial: Trial) -> Trial:
    row = asdict(trial)
    row["recover_s"] = [round(x, 3) for x in trial.recover_s]
    print(json.dumps(row), flush=True)
    return trial


FAULTS: dict[str, Callable[[int], Awaitable[list[Trial]]]] = {
    "lossy": lossy,
    "sigstop": sigstop,
    "restart": restart,
}
TITLES = {
    "lossy": "Lost replies under load: reply lost after Redis ran it, connection cut "
    "(every 50-250 ms; 3 in 4 a script call), 10 streams",
    "sigstop": "Redis SIGSTOP for 10.5-12 s (> the 10 s socket timeout), 10 streams",
    "restart": "Redis `kill -9` + restart (AOF everysec, down 0.1-1 s), 50 streams",
}


def summary(fault: str, trials: list[Trial]) -> dict[str, Any]:
    recover = [x for t in trials for x in t.recover_s]
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
    return head + "\n".join(lines) + "\n"


def write_doc(path: str, table: str) -> None:
    """Replace what lies between the markers in ``path`` with ``table``."""
    with open(path) as f:
        text = f.read()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    with open(path, "w") as f:
        f.write(text[:start] + "\n" + table + text[end:])


async def main_async(args: argparse.Namespace) -> None:
    random.seed(args.seed)
    rows, trials = [], {}
    for fault in args.faults:
        done = await FAULTS[fault](args.trials)
        trials[fault] = [asdict(t) for t in done]
        rows.append(summary(fault, done))
        print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as out:
            meta = {"trials": args.trials, "seed": args.seed, "lease_s": LEASE_S}
            json.dump({**meta, "summary": rows, "runs": trials}, out, indent=1)
    if args.doc:
        write_doc(args.doc, table)


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
