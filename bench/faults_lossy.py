"""Lost replies for every script (issue 12): each trial aims its losses at one Lua script and
makes the traffic that calls it.

The gateway, two simulator workers and a janitor (chores every second) reach Redis through
``tests/lossy_proxy.LossyProxy``. Every 50-250 ms the reply to the next call of the trial's
target script (3 times in 4) or to the next command of any kind is swallowed after Redis ran
it, and the connection is cut (redis-py replays it). Targets, in a shuffled cycle so each gets
its share of the trials, and the traffic that calls them:

- ``ENQUEUE``, ``PULL``, ``EMIT``, ``RENEW``: the trial's streams (losses start before they are
  submitted; 40 tokens at 40 tokens/s outlive the 0.6 s lease, so their leases are renewed);
  for ``ENQUEUE`` and ``PULL`` six more short streams, one every 0.2-0.4 s;
- ``CANCEL``: five more jobs (``POST /v1/jobs``) cancelled with ``DELETE`` at random moments;
- ``HANDBACK``, ``RELEASE``: a worker holding streams is drained (SIGTERM, 0.2 s grace): it
  releases what waits for it and hands its running jobs back; a fresh worker replaces it;
- ``SWEEP``: the janitor's lease sweep, every second.

Which script a lost reply belonged to is read from the lost command itself (the SHA1 after
``EVALSHA``), named through the script loader (``script_names``), so a loss aimed at one
script and landing elsewhere is counted where it landed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections import Counter
from typing import Any

import httpx

from bench.faults_base import (
    SIM,
    Trial,
    count_ids,
    fleet,
    judge_one,
    report,
    run_streams,
    spawn,
    stop_proc,
)
from shared import scripts
from tests.faults.cluster import Cluster, Proc, StreamRecord, read_stream, stream_completion
from tests.lossy_proxy import LossyProxy
from worker.engines.sim import greedy_text

TARGETS = ("ENQUEUE", "PULL", "EMIT", "RENEW", "CANCEL", "HANDBACK", "RELEASE", "SWEEP")
DRAIN_ENV = {"SLIPSTREAM_DRAIN_GRACE_S": "0.2"}


def script_names() -> dict[str, str]:
    """SHA1 -> name of every Lua script the services run (``shared.scripts.SCRIPTS``, the
    loader's public list: what ``EVALSHA`` sends is each ``Script.sha``)."""
    return {script.sha: script.name for script in scripts.SCRIPTS}


def plan(trials: int) -> list[str]:
    """Each target once per shuffled round, as many rounds as the trials need."""
    order: list[str] = []
    while len(order) < trials:
        order += random.sample(TARGETS, len(TARGETS))
    return order[:trials]


async def losses(proxy: LossyProxy, stop: asyncio.Event, marker: bytes) -> None:
    """Lose a reply every 50-250 ms until ``stop``: ``marker``'s (3 in 4) or any command's."""
    while not stop.is_set():
        if not proxy.armed:
            proxy.arm(marker if random.random() < 0.75 else b"\r\n", spare_replay=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), random.uniform(0.05, 0.25))
    proxy.disarm()


async def until_lost(proxy: LossyProxy, before: int, bound_s: float) -> None:
    """At least a second, then until a reply is lost (``before``: the losses before the
    trial), at most ``bound_s``."""
    await asyncio.sleep(1.0)
    end = time.monotonic() + bound_s
    while len(proxy.lost) == before and time.monotonic() < end:
        await asyncio.sleep(0.05)


async def cancel_jobs(base: str, trial: Trial, n: int = 5) -> None:
    """``n`` jobs of ~10 s, each cancelled at its own random moment in its first second; each
    must end ``cancelled`` with its events in order (no id missing or repeated)."""
    body = {"model": "sim-model", "prompt": f"cancel {trial.trial}", "max_tokens": 400}
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        ids = [(await http.post("/v1/jobs", json=body)).json()["id"] for _ in range(n)]
        await asyncio.gather(*(cancel_one(http, trial, job_id) for job_id in ids))


async def cancel_one(http: httpx.AsyncClient, trial: Trial, job_id: str) -> None:
    await asyncio.sleep(random.uniform(0.1, 1.0))
    answer = await http.delete(f"/v1/jobs/{job_id}")
    trial.count(f"cancel_http_{answer.status_code}")
    status = await final_status(http, job_id)
    trial.count("cancelled" if status == "cancelled" else "cancel_not_honoured")
    if status != "cancelled" or answer.status_code != 200:
        trial.errors.append(f"cancel {job_id}: HTTP {answer.status_code}, ended {status}")
    record = StreamRecord(job_id=job_id)
    async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        await asyncio.wait_for(read_stream(response, record), 20)
    count_ids(trial, record)


async def trickle(base: str, trial: Trial, n: int = 6, tokens: int = 12) -> None:
    """``n`` short streams, one every 0.2-0.4 s: an enqueue and a pull at a time, each one a
    chance for the armed loss (a burst of streams gives a script one chance per trial)."""
    prompts = [f"trickle {trial.trial} {random.random():.6f} {i}" for i in range(n)]
    records = [StreamRecord() for _ in prompts]
    tasks = []
    for prompt, record in zip(prompts, records, strict=True):
        tasks.append(asyncio.create_task(stream_completion(base, prompt, tokens, record)))
        await asyncio.sleep(random.uniform(0.2, 0.4))
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 90)
    trial.errors += [repr(r)[:200] for r in results if isinstance(r, BaseException)]
    trial.streams += n
    for prompt, record in zip(prompts, records, strict=True):
        judge_one(trial, record, greedy_text(prompt, tokens))
        trial.recover_s.append(record.largest_gap_s())


async def final_status(http: httpx.AsyncClient, job_id: str, timeout: float = 20.0) -> str:
    end = time.monotonic() + timeout
    status = ""
    while time.monotonic() < end:
        answer = await http.get(f"/v1/jobs/{job_id}")
        status = str(answer.json().get("status", f"HTTP {answer.status_code}"))
        if status not in ("queued", "running") and answer.status_code == 200:
            break
        await asyncio.sleep(0.05)
    return status


async def drain(cluster: Cluster, workers: list[Proc], trial: Trial) -> None:
    """SIGTERM one of the two workers (chosen at random) while it holds streams; it releases
    and hands back (``DRAIN_ENV``); a fresh worker takes its place."""
    await asyncio.sleep(random.uniform(0.0, 0.3))
    victim = workers.pop(random.randrange(len(workers)))
    await stop_proc(victim)
    workers.append(cluster.worker(f"w{trial.trial}", *SIM, **DRAIN_ENV))
    trial.count("drained")


async def lossy(trials: int, streams: int = 10, tokens: int = 40) -> list[Trial]:
    cluster = Cluster.start()
    proxy = await LossyProxy(cluster.redis.port).start()
    names = script_names()
    shas = {name: sha for sha, name in names.items()}
    missing = [t for t in TARGETS if t not in shas]
    if missing:
        raise RuntimeError(f"no SHA for {missing}: has the script loader changed?")
    out = []
    try:
        async with fleet(proxy.url, cluster, **DRAIN_ENV) as base:
            workers = [p for p in cluster.procs if p.name.startswith("worker-")]
            spawn(cluster, "janitor", ["janitor"], {"SLIPSTREAM_JANITOR_INTERVAL_S": "1"})
            for n, target in enumerate(plan(trials)):
                trial = Trial("lossy", n, streams, target=target)
                trial.detail["tokens"] = tokens
                out.append(await one_trial(cluster, proxy, base, workers, trial, shas, names))
                await cluster.wait_workers(2)
    finally:
        cluster.stop()  # first: the processes' connections end, so the proxy's pumps do too
        await asyncio.sleep(0.2)
        await proxy.close()
    return out


async def one_trial(
    cluster: Cluster,
    proxy: LossyProxy,
    base: str,
    workers: list[Proc],
    trial: Trial,
    shas: dict[str, str],
    names: dict[str, str],
) -> Trial:
    before, stop = len(proxy.lost), asyncio.Event()
    losing = asyncio.create_task(losses(proxy, stop, shas[trial.target].encode()))
    side: list[asyncio.Task[Any]] = []
    if trial.target == "CANCEL":
        side.append(asyncio.create_task(cancel_jobs(base, trial)))
    elif trial.target in ("ENQUEUE", "PULL"):
        side.append(asyncio.create_task(trickle(base, trial)))
    fault = functools.partial(asyncio.sleep, 0)
    if trial.target in ("HANDBACK", "RELEASE"):
        fault = functools.partial(drain, cluster, workers, trial)
    elif trial.target == "SWEEP":  # a sweep or two while streams run: the janitor sweeps
        # every second once it has started, which can take longer than a short trial
        fault = functools.partial(until_lost, proxy, before, 10.0)
    try:
        records = await run_streams(base, trial, int(trial.detail["tokens"]), fault)
        for result in await asyncio.gather(*side, return_exceptions=True):
            if isinstance(result, BaseException):
                trial.errors.append(repr(result)[:200])
    finally:
        stop.set()
        await losing
    calls = Counter(c for lost in proxy.lost[before:] for c in lost.calls())
    trial.lost = {names.get(c, c): n for c, n in sorted(calls.items())}
    trial.detail["replies_lost"] = len(proxy.lost) - before
    trial.recover_s += [r.largest_gap_s() for r in records]
    return report(trial)
