"""What every Redis-fault trial of ``bench/faults.py`` shares: the ``Trial`` record, the judge
of what the clients saw, the fleet of real processes and the stream runner.

A trial is judged only by what its clients saw (SSE ids, texts, terminals) and by the job
hashes in Redis; nothing inside the services is instrumented for it, so the figures hold for
the code as shipped.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.faults.cluster import (
    FAST_LEASES,
    Cluster,
    Proc,
    StreamRecord,
    stream_completion,
    wait_frames,
)
from worker.engines.sim import greedy_text

LEASE_S = float(FAST_LEASES["SLIPSTREAM_LEASE_S"])
SIM = ("--max-seqs", "32", "--sim-ttft-ms", "5", "--sim-tokens-per-s", "40")


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
    target: str = ""  # what the trial aimed at (a script, a set of skews)
    lost: dict[str, int] = field(default_factory=dict)  # replies lost, per script or command
    checks: dict[str, int] = field(default_factory=dict)  # the fault's own counts (summed)

    def count(self, name: str, n: int = 1) -> None:
        self.checks[name] = self.checks.get(name, 0) + n


def count_ids(trial: Trial, record: StreamRecord) -> None:
    """Tokens lost (ids missing below the highest seen) and duplicated (ids seen twice)."""
    ids = record.ids()
    if ids:
        trial.tokens_lost += len(set(range(1, max(ids) + 1)) - set(ids))
        trial.tokens_duplicated += len(ids) - len(set(ids))


def judge_one(trial: Trial, record: StreamRecord, expected_text: str) -> bool:
    count_ids(trial, record)
    done = bool(record.frames) and record.frames[-1][1] == "[DONE]"
    ok = done and len(record.terminals()) == 1 and "error" not in record.terminals()[0]
    trial.completed += int(ok)
    trial.wrongly_failed += int(not ok)
    if not ok:
        tail = [data[:160] for _, data, _ in record.frames[-2:]]
        trial.errors.append(f"stream {record.job_id or '-'} HTTP {record.status}: ends {tail}")
    trial.text_wrong += int(record.text() != expected_text)
    return ok


def judge(trial: Trial, prompts: list[str], records: list[StreamRecord], tokens: int) -> None:
    for prompt, record in zip(prompts, records, strict=True):
        judge_one(trial, record, greedy_text(prompt, tokens))


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
        try:
            await asyncio.gather(*(first_frames(r, t) for r, t in zip(records, tasks, strict=True)))
        except TimeoutError:  # judged below (a stream that never ends is wrongly failed)
            slow = [f"{r.job_id or '-'} (HTTP {r.status})" for r in records if len(r.frames) < 2]
            trial.errors.append(f"no first token within 60 s: {slow}")
        await fault()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
    finally:
        for task in tasks:
            task.cancel()
    trial.errors += [repr(r)[:200] for r in results if isinstance(r, BaseException)]
    judge(trial, prompts, records, tokens)
    return records


async def first_frames(record: StreamRecord, task: asyncio.Task[None]) -> None:
    """Until the stream has two frames (``TimeoutError`` after 60 s) or has ended first (a
    refused request has none; it is judged with the others)."""
    waiting = asyncio.create_task(wait_frames(record, 2, timeout=60))
    done, _ = await asyncio.wait([waiting, task], return_when=asyncio.FIRST_COMPLETED)
    if waiting in done:
        waiting.result()
        return
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)


@asynccontextmanager
async def fleet(redis_url: str, cluster: Cluster, **env: str) -> AsyncIterator[str]:
    """A gateway and two workers (``env`` added to theirs) on ``redis_url``; yields the
    gateway's base URL."""
    cluster.env["REDIS_URL"] = redis_url
    gateway = cluster.gateway()
    cluster.worker("a", *SIM, **env)
    cluster.worker("b", *SIM, **env)
    await cluster.wait_workers(2)
    yield f"http://127.0.0.1:{gateway.port}"


def spawn(
    cluster: Cluster, name: str, args: list[str], env: dict[str, str], log: Path | None = None
) -> Proc:
    """``python -m slipstream <args>`` with ``env`` added, its output to ``log`` (or nowhere);
    a child of ``cluster`` (killed by ``cluster.stop()``)."""
    with open(log or "/dev/null", "ab") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "slipstream", *args],
            env={**cluster.env, **env},
            stdout=out,
            stderr=out,
        )
    proc = Proc(name, popen)
    cluster.procs.append(proc)
    return proc


async def stop_proc(proc: Proc, timeout: float = 20.0) -> None:
    """SIGTERM (a worker drains, a gateway shuts down); SIGKILL after ``timeout``."""
    proc.signal(15)
    try:
        await asyncio.to_thread(proc.popen.wait, timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def report(trial: Trial) -> Trial:
    row = asdict(trial)
    row["recover_s"] = [round(x, 3) for x in trial.recover_s]
    print(json.dumps(row), flush=True)
    return trial
