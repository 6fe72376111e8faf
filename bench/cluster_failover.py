"""Redis Cluster failover under load: three models on three shards streaming at once while the
master of one model's shard is ``kill -9``-ed; what the clients of each model saw.

A 3-master, 3-replica cluster on loopback (``tests/faults/redis_cluster.py``); two gateways,
sim workers (two for the model whose shard dies, one for each other model) and a janitor,
every process on the ``redis+cluster://`` URL (the janitor's arq on a plain control Redis,
``SLIPSTREAM_CONTROL_REDIS_URL``). Once every stream has its first tokens, the victim
shard's master dies. ``victim`` picks which: 0, 1 or 2, the shards in the order of the slots
they serve. They are not alike: besides its model's keys (and its share of the job-index
keys) each holds some global keys every process writes (``shard_roles``), and shard 0 serves
slot 0, where redis-py's cluster client sends its non-key commands (``COMMAND`` when it
re-reads the cluster's layout after a node failed).

Reported per model: streams completed, streams whose text equals the simulator's
uninterrupted greedy answer, tokens lost or duplicated as the clients saw them (SSE ids),
streams the client had to resume with Last-Event-ID (its connection was cut), the largest
silence between two frames of any stream, and for the killed shard how long until each
stream flowed again. The test ``tests/faults/test_redis_cluster.py`` asserts on the same run.

    flock /tmp/slipstream-bench.lock .venv/bin/python -m bench.cluster_failover \\
        --streams 8 --runs 3 --victim 0 1 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from redis.crc import key_slot

from bench.sentinel_failover import resumed_at
from shared.keys import Keys
from tests.faults.cluster import (
    FAST_LEASES,
    Cluster,
    Proc,
    StreamRecord,
    resume,
    stream_completion,
    wait_frames,
    wait_workers,
)
from tests.faults.redis_cluster import RedisClusterSet
from tests.helpers import free_port, start_redis, wait_for_port
from worker.engines.sim import greedy_text

MAX_TOKENS = 80
SIM = ("--engine", "sim", "--max-seqs", "32", "--sim-ttft-ms", "5", "--sim-tokens-per-s", "20")
RESUMES = 3  # Last-Event-ID attempts per stream before it counts as not completed


@dataclass
class ModelOutcome:
    """What the clients of one model saw."""

    model: str
    master: int  # the port of its shard's master before the kill
    killed: bool
    streams: int
    completed: int = 0  # ended with [DONE] and exactly one finish
    text_equal: int = 0
    tokens_lost: int = 0
    tokens_duplicated: int = 0
    client_resumes: int = 0  # Last-Event-ID requests its clients made (connection cut)
    unfinished: int = 0  # clients still waiting 45 s after the kill (or that raised)
    largest_gap_s: float = 0.0  # longest silence between two frames of any of its streams
    resume_p50_s: float = 0.0  # killed shard: kill -> a stream flowing again, median
    resume_max_s: float = 0.0
    stuck: list[str] = field(default_factory=list)  # unfinished streams' jobs (``stuck_job``)


@dataclass
class Outcome:
    """One run: the failover as the cluster and every model's clients saw it."""

    streams_per_model: int
    victim: int  # the shard killed (0, 1, 2 in slot order; -1: none)
    victim_holds: list[str] = field(default_factory=list)  # ``shard_roles`` of that shard
    failover_s: float = 0.0  # kill -> every surviving node names the promoted replica
    promoted_replica: bool = False  # the killed master's own replica took its slots
    janitor_alive: bool = True
    models: list[ModelOutcome] = field(default_factory=list)
    records: dict[str, list[StreamRecord]] = field(default_factory=dict, repr=False)
    prompts: dict[str, list[str]] = field(default_factory=dict, repr=False)
    logs: Path | None = field(default=None, repr=False)  # the processes' stderr

    def figures(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("records", "prompts", "logs"):
            out.pop(name)
        return out

    def model(self, killed: bool) -> list[ModelOutcome]:
        return [m for m in self.models if m.killed == killed]


def spawn(fleet: Cluster, logs: Path, name: str, args: list[str], port: int = 0) -> Proc:
    """A ``slipstream`` process with the fleet's environment, its stderr in ``logs``."""
    with open(logs / f"{name}.log", "wb") as err:
        popen = subprocess.Popen(
            [sys.executable, "-m", "slipstream", *args],
            env=fleet.env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    proc = Proc(name, popen, port or None)
    fleet.procs.append(proc)
    return proc


def start_fleet(group: RedisClusterSet, models: list[str], victim: str, logs: Path) -> Cluster:
    """Two gateways, sim workers (two for ``victim``) and a janitor, on the Cluster URL."""
    control = start_redis()
    env = {
        **os.environ,
        **FAST_LEASES,
        "REDIS_URL": group.url,
        "SLIPSTREAM_CONTROL_REDIS_URL": control.url,
        "SLIPSTREAM_JANITOR_INTERVAL_S": "1",
    }
    fleet = Cluster(control, env)
    accepted = [arg for model in models for arg in ("--model", model)]
    for _ in range(2):
        port = free_port()
        spawn(fleet, logs, f"gateway-{port}", ["gateway", "--port", str(port), *accepted], port)
    for model in models:
        for i in range(2 if model == victim else 1):
            worker = ["worker", "--model", model, "--worker-id", f"{model}-{i}", *SIM]
            spawn(fleet, logs, f"worker-{model}-{i}", worker)
    spawn(fleet, logs, "janitor", ["janitor"])
    for proc in fleet.procs:
        if proc.port:
            wait_for_port(proc.port, 30)
    return fleet


def pick_models(group: RedisClusterSet, victim: int) -> tuple[list[str], str]:
    """Three models on three masters, in the order of the slots their masters serve, and
    the one whose shard dies (``victim``: 0, 1 or 2 in that order)."""
    order = group.masters_in_slot_order()
    models = group.models_on_distinct_masters(3, prefix="shard")
    models.sort(key=lambda model: order.index(group.master_for_model(model)))
    return models, models[victim]


def shard_roles(group: RedisClusterSet, prefix: str = "slip") -> dict[int, list[str]]:
    """Master port -> what it holds besides its models' keys: the first slot (redis-py's
    cluster client runs its non-key commands, COMMAND included, on slot 0's master) and the
    global keys every process writes (the worker registry, its heartbeat index, ...)."""
    keys = Keys(prefix)
    held = {"slot 0": 0}
    for name in ("workers", "workers_seen", "models", "api_keys"):
        held[name] = key_slot(getattr(keys, name).encode())
    roles: dict[int, list[str]] = {}
    for name, slot in held.items():
        roles.setdefault(group.master_of_slot(slot), []).append(name)
    return roles


async def run_stream(bases: list[str], i: int, model: str, prompt: str, rec: StreamRecord) -> int:
    """One client: stream, and resume with Last-Event-ID (the other gateway first) while the
    connection was cut before [DONE]; returns how many resumes it made."""
    with contextlib.suppress(httpx.HTTPError):
        await stream_completion(bases[i % 2], prompt, MAX_TOKENS, rec, model=model, timeout=20)
    resumes = 0
    while not ended(rec) and rec.job_id and resumes < RESUMES:
        resumes += 1
        try:
            await resume(bases[(i + resumes) % 2], rec, timeout=20)
        except httpx.HTTPError:
            await asyncio.sleep(0.5)
    return resumes


async def started(record: StreamRecord, task: asyncio.Task[int], timeout: float = 30) -> None:
    """Until the stream has its first tokens; a client that already gave up fails at once."""
    waiting = asyncio.create_task(wait_frames(record, 3, timeout))
    await asyncio.wait([waiting, task], return_when=asyncio.FIRST_COMPLETED)
    if not waiting.done():
        waiting.cancel()
        raise RuntimeError(f"a stream ended before its first tokens: {record.frames[:3]}")
    waiting.result()


def ended(record: StreamRecord) -> bool:
    return bool(record.frames) and record.frames[-1][1] == "[DONE]"


async def failover(streams: int, victim: int = 1, *, kill: bool = True) -> Outcome:
    """``streams`` streams per model; once each has tokens, kill the victim shard's master
    (unless ``kill`` is off: the same run without a fault); let them all finish."""
    group = RedisClusterSet.start()
    outcome = Outcome(streams, victim if kill else -1)
    outcome.logs = Path(tempfile.mkdtemp(prefix="slip-cluster-logs-"))
    fleet: list[Cluster] = []
    try:
        await scenario(group, outcome, fleet, kill)
        return outcome
    except BaseException as exc:
        exc.add_note(log_tails(outcome))  # what the processes said, for the failing test
        raise
    finally:
        for started_fleet in fleet:
            started_fleet.stop()
        group.stop()


async def scenario(
    group: RedisClusterSet, outcome: Outcome, fleet: list[Cluster], kill: bool
) -> None:
    """The run itself (``fleet`` receives the processes, for the caller to stop)."""
    models, doomed = pick_models(group, max(outcome.victim, 0))
    masters = {m: group.master_for_model(m) for m in models}
    outcome.victim_holds = shard_roles(group).get(masters[doomed], []) if kill else []
    fleet.append(start_fleet(group, models, doomed, outcome.logs or Path(".")))
    await wait_workers(group.url, 4, 30.0)
    bases = [f"http://127.0.0.1:{p.port}" for p in fleet[0].procs if p.port]
    outcome.prompts = {m: [f"{m} {i}" for i in range(outcome.streams_per_model)] for m in models}
    outcome.records = {m: [StreamRecord() for _ in outcome.prompts[m]] for m in models}
    tasks = {
        m: [
            asyncio.create_task(run_stream(bases, i, m, p, r))
            for i, (p, r) in enumerate(zip(outcome.prompts[m], outcome.records[m], strict=True))
        ]
        for m in models
    }
    await asyncio.gather(
        *(started(r, t) for m in models for r, t in zip(outcome.records[m], tasks[m], strict=True))
    )
    killed_at = time.monotonic()
    if kill:
        replica = group.replica_of(masters[doomed])
        group.kill_master(masters[doomed])
        slot = group.slot_of_model(doomed)
        new = await asyncio.to_thread(group.wait_failover, masters[doomed], slot)
        outcome.failover_s = time.monotonic() - killed_at
        outcome.promoted_replica = new == replica
    everything = [t for m in models for t in tasks[m]]
    await asyncio.wait(everything, timeout=25)  # what did not end by then is unfinished
    janitor = next(p for p in fleet[0].procs if p.name == "janitor")
    outcome.janitor_alive = janitor.popen.poll() is None
    for m in models:
        done = judge(outcome, m, masters[m], kill and m == doomed, killed_at)
        for task, record in zip(tasks[m], outcome.records[m], strict=True):
            finished = task.done() and not task.cancelled() and not task.exception()
            done.client_resumes += task.result() if finished else 0
            if not finished:
                done.unfinished += 1
                done.stuck.append(stuck_job(group, m, record))
            task.cancel()
    await asyncio.gather(*everything, return_exceptions=True)  # the cancelled ones close


def stuck_job(group: RedisClusterSet, model: str, record: StreamRecord) -> str:
    """Where an unfinished stream's job stands in Redis: its state hash (without the
    payload) and its log's length and last sequence number, against what the client saw.
    A finished job with a complete log points at the gateway; a running one at the worker."""
    keys = Keys()
    port = group.master_for_model(model)
    try:
        with group.client(port) as node:
            state = node.hgetall(keys.job(model, record.job_id))
            log = node.xrevrange(keys.job_log(model, record.job_id), count=1)
            length = node.xlen(keys.job_log(model, record.job_id))
    except redis.RedisError as exc:
        return f"{record.job_id}: {exc!r}"
    state.pop("payload", None)
    last = log[0][1].get("e", "")[-160:] if log else ""
    seen = record.ids()[-1] if record.ids() else None
    return f"{record.job_id}: client at id {seen}; {state}; log {length} entries, last {last}"


def judge(outcome: Outcome, model: str, master: int, killed: bool, at: float) -> ModelOutcome:
    """One model's figures against the simulator's uninterrupted answers."""
    result = ModelOutcome(model, master, killed, outcome.streams_per_model)
    outcome.models.append(result)
    flowing_again = []
    for prompt, record in zip(outcome.prompts[model], outcome.records[model], strict=True):
        ids = record.ids()
        if ids:
            result.tokens_lost += len(set(range(ids[0], max(ids) + 1)) - set(ids))
            result.tokens_duplicated += len(ids) - len(set(ids))
        result.completed += int(ended(record) and len(record.terminals()) == 1)
        result.text_equal += int(record.text() == greedy_text(prompt, MAX_TOKENS))
        result.largest_gap_s = max(result.largest_gap_s, record.largest_gap_s())
        if killed and (again := resumed_at(record, at)) is not None:
            flowing_again.append(again - at)
    if flowing_again:
        result.resume_p50_s = statistics.median(flowing_again)
        result.resume_max_s = max(flowing_again)
    return result


def log_tails(outcome: Outcome, lines: int = 12) -> str:
    """What every process said on stderr, condensed for a failing test's message: each
    logged event with its count, the first traceback in full (its last ``3 * lines`` lines),
    and the last ``lines`` lines that are not JSON (a crash's own traceback)."""
    if outcome.logs is None:
        return ""
    out = []
    for path in sorted(outcome.logs.glob("*.log")):
        events: dict[str, int] = {}
        first_trace, plain = "", []
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                plain.append(line)
                continue
            name = f"{entry.get('level', '?')} {entry.get('event', '?')}"
            events[name] = events.get(name, 0) + 1
            first_trace = first_trace or str(entry.get("exception", ""))
        if events or plain:
            out.append(f"--- {path.name}: {events}")
            out += first_trace.splitlines()[-3 * lines :] + plain[-lines:]
    return "\n".join(out)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| victim shard (holds) | failover (s) | model | killed | streams | completed | text equal "
        "| lost / dup | client resumes | largest gap (s) | flowing again p50 / max (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['victim']} ({', '.join(r['victim_holds'])}) | {r['failover_s']:.2f} "
        f"| {m['model']} | {'yes' if m['killed'] else ''} "
        f"| {m['streams']} | {m['completed']} | {m['text_equal']} "
        f"| {m['tokens_lost']} / {m['tokens_duplicated']} | {m['client_resumes']} "
        f"| {m['largest_gap_s']:.2f} | {m['resume_p50_s']:.2f} / {m['resume_max_s']:.2f} |"
        for r in rows
        for m in r["models"]
    ]
    return head + "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> None:
    rows: list[dict[str, Any]] = []
    for victim in args.victim:
        for _ in range(args.runs):
            outcome = await failover(args.streams, victim)
            rows.append(outcome.figures())
            print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as out:
            json.dump(rows, out, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8, help="streams per model")
    parser.add_argument("--runs", type=int, default=1, help="failovers per victim shard")
    parser.add_argument("--victim", type=int, nargs="+", default=[0, 1, 2], choices=[0, 1, 2])
    parser.add_argument("--out", default="", help="write the figures as JSON here")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
