"""Clock skew (issue 12): workers, and the gateway that takes requests with deadlines, whose
clocks are off by up to 30 s either way, beside a correct worker and a correct gateway.

Every time-based decision (leases, liveness, deadlines) must use Redis's clock, so a skewed
host must change nothing. Per trial two workers (``s1``, ``s2``) start under libfaketime
(``LD_PRELOAD=libfaketimeMT.so.1 FAKETIME=±Ns``, the library found with ``dpkg -L``), each
skewed with probability 3 in 4 (at least one of them), by 30 s (1 in 3) or a uniform 1-30 s,
ahead or behind at random; a second gateway is skewed the same way or not at all. With the
correct worker ``ok`` they have three slots each (40 tokens/s, lease 0.6 s, heartbeat 0.1 s).

1. Nine streams through the correct gateway (all nine slots: each worker serves three), each
   30-70 tokens (about 1-3 leases long, renewed every heartbeat); one in two carries a
   generous ``X-Deadline-Ms`` (10 s) that must not cut it short.
2. Through the gateway that may be skewed: a request whose deadline it meets (200), then,
   with every slot busy with long jobs, one whose deadline (1-2.5 s) cannot be met: a 504
   ``deadline_exceeded`` within [deadline - 0.2 s, deadline + 2 s] of Redis's time, or a 429
   ``deadline_unattainable`` at once where admission already sees the backlog (the
   gateway looks at a deadline at least once a second; a host's ±30 s would show as a 504 at
   once or half a minute late).

Counted: tokens lost and duplicated, texts wrong, streams wrongly failed; ``leases_taken``
(``job_fenced`` lines in the workers' logs: a worker found its live lease taken),
``deliveries_gt1`` (jobs delivered more than once: no worker dies here, so every redelivery
is a lease taken from a live worker), ``workers_seen_dead`` (samples every 0.1 s of the
Redis-clocked live set missing a running worker), ``deadline_checks``/``deadline_misses``.
"Recover" is the longest pause between two tokens of a stream (a takeover shows as one).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench.faults_base import Trial, judge_one, report, spawn, stop_proc
from shared.fleet import live_workers
from shared.keys import Keys
from shared.redis import connect
from tests.faults.cluster import Cluster, Proc, StreamRecord, stream_completion
from tests.helpers import free_port, wait_for_port
from worker.engines.sim import greedy_text

LIBRARY = "libfaketimeMT.so.1"
MODEL = "sim-model"
LATE_S = 2.0  # a 504 this late still honours the deadline (checked every <= 1 s, loaded host)


def faketime_lib() -> str:
    """The multi-threaded libfaketime, as the Debian package installed it."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        listing = subprocess.run(
            ["dpkg", "-L", "libfaketime"], capture_output=True, text=True, timeout=10
        ).stdout
        for line in listing.splitlines():
            if line.endswith("/" + LIBRARY):
                return line
    raise RuntimeError("clock skew needs libfaketime: bash scripts/install-system-deps.sh faketime")


def skew_env(lib: str, seconds: float) -> dict[str, str]:
    if not seconds:
        return {}
    return {"LD_PRELOAD": lib, "FAKETIME": f"{seconds:+.2f}s", "FAKETIME_DONT_RESET": "1"}


def draw_skews() -> dict[str, float]:
    """Seconds each of ``s1``, ``s2`` and the deadline gateway is off (0: correct)."""

    def one() -> float:
        if random.random() >= 0.75:
            return 0.0
        size = 30.0 if random.random() < 1 / 3 else random.uniform(1.0, 30.0)
        return round(random.choice((-1, 1)) * size, 2)

    skews = {"s1": one(), "s2": one(), "gateway": one()}
    while not skews["s1"] and not skews["s2"]:
        skews["s1"] = one()
    return skews


async def live_ids(url: str) -> set[str]:
    redis = connect(url)
    try:
        return {w.id for w in await live_workers(redis, Keys(), 1.0)}
    finally:
        await redis.aclose()


async def wait_live(url: str, want: set[str], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not want <= await live_ids(url):
        if time.monotonic() > end:
            raise TimeoutError(f"workers {want} did not all register")
        await asyncio.sleep(0.1)


async def watch_live(url: str, want: set[str], trial: Trial, stop: asyncio.Event) -> None:
    """Sample the live set every 0.1 s until ``stop``; count samples missing a worker."""
    while not stop.is_set():
        if missing := want - await live_ids(url):
            trial.count("workers_seen_dead")
            trial.errors.append(f"not live: {sorted(missing)}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


async def skew(
    trials: int, streams: int = 9, tokens: int = 0, late_s: float = LATE_S
) -> list[Trial]:
    """``tokens`` 0: each trial draws 30-70; a 504 more than ``late_s`` after its deadline
    counts as a miss."""
    lib = faketime_lib()
    cluster = Cluster.start(
        SLIPSTREAM_MAX_SEQS="3", SLIPSTREAM_SIM_TOKENS_PER_S="40", SLIPSTREAM_LOG_LEVEL="info"
    )
    out = []
    with tempfile.TemporaryDirectory(prefix="faults-skew-") as tmp:
        logs = Path(tmp)
        try:
            base = await gateway(cluster, "gateway", {}, logs / "gateway.log")
            spawn(cluster, "ok", worker_args("ok"), {}, logs / "ok.log")
            for n in range(trials):
                trial = Trial("skew", n, streams)
                trial.detail["tokens"] = tokens or random.randint(30, 70)
                trial.detail["late_s"] = late_s
                out.append(report(await skew_trial(cluster, lib, logs, base, trial)))
        finally:
            cluster.stop()
    return out


def worker_args(worker_id: str) -> list[str]:
    return ["worker", "--model", MODEL, "--engine", "sim", "--worker-id", worker_id]


async def gateway(cluster: Cluster, name: str, env: dict[str, str], log: Path) -> str:
    port = free_port()
    spawn(cluster, name, ["gateway", "--port", str(port), "--model", MODEL], env, log)
    await asyncio.to_thread(wait_for_port, port, 30)
    return f"http://127.0.0.1:{port}"


async def skew_trial(cluster: Cluster, lib: str, logs: Path, base: str, trial: Trial) -> Trial:
    skews = draw_skews()
    trial.detail |= {f"{k}_skew_s": v for k, v in skews.items()}
    trial.target = ", ".join(f"{k} {v:+.0f} s" for k, v in skews.items() if v)
    n = trial.trial
    ids = {"s1": f"s1-{n}", "s2": f"s2-{n}"}
    procs: list[Proc] = [
        spawn(cluster, ids[k], worker_args(ids[k]), skew_env(lib, skews[k]), logs / f"{ids[k]}.log")
        for k in ids
    ]
    dl_base = base
    if skews["gateway"]:
        env = skew_env(lib, skews["gateway"])
        dl_base = await gateway(cluster, f"gw-{n}", env, logs / f"gw-{n}.log")
        procs.append(cluster.procs[-1])
    ok_log = logs / "ok.log"
    ok_from = ok_log.stat().st_size
    want = {"ok", *ids.values()}
    await wait_live(cluster.redis.url, want)
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_live(cluster.redis.url, want, trial, stop))
    skewed = {ids[k] for k in ids if skews[k]}
    try:
        await skew_streams(cluster, base, trial, skewed)
        await deadlines(cluster, base, dl_base, trial, skewed)
    finally:
        stop.set()
        await watcher
        for proc in procs:
            await stop_proc(proc)
    fenced = ok_log.read_bytes()[ok_from:].count(b"job_fenced")
    fenced += sum((logs / f"{i}.log").read_bytes().count(b"job_fenced") for i in ids.values())
    trial.count("leases_taken", fenced)
    return trial


async def job_fields(cluster: Cluster, job_id: str) -> dict[str, str]:
    redis = connect(cluster.redis.url)
    try:
        fields = await redis.hgetall(Keys().job(MODEL, job_id))  # type: ignore[misc]
    finally:
        await redis.aclose()
    return {str(k): str(v) for k, v in fields.items()}


async def delivered(cluster: Cluster, trial: Trial, job_id: str, skewed: set[str]) -> None:
    fields = await job_fields(cluster, job_id)
    trial.count("jobs")
    trial.count("deliveries_gt1", int(int(fields.get("deliveries", "0")) > 1))
    trial.count("on_skewed_worker", int(fields.get("owner", "").split(":")[0] in skewed))


async def skew_streams(cluster: Cluster, base: str, trial: Trial, skewed: set[str]) -> None:
    tokens = int(trial.detail["tokens"])
    prompts = [f"skew {trial.trial} {random.random():.6f} {i}" for i in range(trial.streams)]
    records = [StreamRecord() for _ in prompts]
    heads = [{"X-Deadline-Ms": "10000"} if i % 2 else None for i in range(trial.streams)]
    results = await asyncio.wait_for(
        asyncio.gather(
            *(
                stream_completion(base, p, tokens, r, headers=h, timeout=60)
                for p, r, h in zip(prompts, records, heads, strict=True)
            ),
            return_exceptions=True,
        ),
        90,
    )
    trial.errors += [repr(r)[:200] for r in results if isinstance(r, BaseException)]
    for prompt, record, head in zip(prompts, records, heads, strict=True):
        ok = judge_one(trial, record, greedy_text(prompt, tokens))
        if head:
            trial.count("deadline_checks")
            trial.count("deadline_misses", int(not ok))
        if record.job_id:
            await delivered(cluster, trial, record.job_id, skewed)
    trial.recover_s = [r.largest_gap_s() for r in records]


async def deadlines(
    cluster: Cluster, base: str, dl_base: str, trial: Trial, skewed: set[str]
) -> None:
    """A deadline that can be met is met; one that cannot ends in a 504 on Redis's time."""
    body = {"model": MODEL, "prompt": f"dl {trial.trial}", "max_tokens": 12, "deadline_ms": 5000}
    async with (
        httpx.AsyncClient(base_url=dl_base, timeout=60) as late,
        httpx.AsyncClient(base_url=base, timeout=30) as http,
    ):
        fits = await late.post("/v1/completions", json=body)
        trial.count("deadline_checks")
        if fits.status_code != 200:
            trial.count("deadline_misses")
            trial.errors.append(f"deadline that fits: {fits.status_code} {fits.text[:160]}")
        long_ids = await fill_every_slot(http, slots=9)
        deadline_ms = random.randint(1000, 2500)
        started = time.monotonic()
        queued = await late.post("/v1/completions", json=body | {"deadline_ms": deadline_ms})
        took = time.monotonic() - started
        trial.detail |= {"deadline_ms": deadline_ms, "deadline_took_s": round(took, 3)}
        code = queued.json().get("error", {}).get("code") if queued.status_code >= 400 else None
        trial.count("deadline_checks")
        over = took - deadline_ms / 1000  # the gateway looks at a deadline at least every 1 s
        trial.detail["deadline_late_s"] = round(over, 3)
        if code == "deadline_unattainable":  # 429: admission saw the backlog, refused up front
            trial.count("deadline_refused_upfront")
        elif code != "deadline_exceeded" or not -0.2 <= over <= trial.detail["late_s"]:
            trial.count("deadline_misses")
            trial.errors.append(f"deadline {deadline_ms} ms: {queued.status_code}, {took:.2f} s")
        for job_id in long_ids:  # ~5 s each: many leases long, renewed by skewed workers too
            await http.delete(f"/v1/jobs/{job_id}")
            await delivered(cluster, trial, job_id, skewed)


async def fill_every_slot(http: httpx.AsyncClient, slots: int) -> list[str]:
    """``slots`` jobs of ~5 s, all running (every slot of the three workers busy)."""
    body = {"model": MODEL, "prompt": "long", "max_tokens": 200}
    ids = [(await http.post("/v1/jobs", json=body)).json()["id"] for _ in range(slots)]
    end = time.monotonic() + 20
    for job_id in ids:
        while (await http.get(f"/v1/jobs/{job_id}")).json()["status"] != "running":
            if time.monotonic() > end:
                raise TimeoutError("the long jobs did not all start")
            await asyncio.sleep(0.05)
    return ids
