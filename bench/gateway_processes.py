"""Gateway processes, N = 1 against N = 2 on one port (``slipstream gateway --processes N``).

    flock /tmp/slipstream-bench.lock .venv/bin/python -m bench.gateway_processes \
        --out docs/gateway_processes.json

Two experiments, each arm (N) in its own fresh Redis + gateway + simulated workers, the arms
alternated (N=1, N=2, N=1, N=2 ...) and the medians reported with their spread:

- Relay at saturation: ``--relay-streams`` long streams from simulated workers generating
  ``--relay-tps`` tokens/s each (more than the gateway and this machine can carry), read by a
  lean client process that only counts SSE token frames and reopens a stream that ends.
  Reported: tokens/s the client received, CPU cores used per component (the gateway is the
  supervisor and its children together, ``per_process_cores`` each child), CPU µs per token,
  the gateway's share of all CPU used, and what one gateway core relays at its measured cost.
- Streams held: ``--hold`` streams at 1 token/s each (SSE pings on), opened at
  ``--ramp`` per second behind ``bench.streams``' simulated workers, then, once every stream
  had its first token, held ``--hold-s`` seconds: how many opened, the gateway's RSS
  growth per stream (all its processes summed), delivery latency from publish to client
  (``bench.streams``' method) and the ``/healthz`` round trip from a separate probe process.

On a 2-core machine the load generator, Redis, the workers and the gateways share both cores,
so N = 2 cannot show 2x: read ``gateway_share`` and ``tokens_per_gateway_core`` to extrapolate
to a host where each gateway process has a core of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import psutil

from bench.arms import SlipstreamArm
from bench.fleet import MODEL, Backend
from bench.machine import describe
from bench.process import PYTHON, own_cpu_seconds, wait_until
from bench.result import Result
from bench.stamper import Stamper
from bench.stats import combine, percentile
from bench.streams import (
    _delivery,
    _loop_lag,
    _open,
    _probe,
    _wait_open,
    stream_fleet,
    wait_started,
)

T = TypeVar("T")

CLIENT = r"""
import asyncio, json, sys, time
FRAME = b"\nid: "
async def one(port, i, max_tokens, model, counts):
    while True:  # a stream that ends is reopened: the load stays at N streams
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"model":"%s","prompt":"r %d","max_tokens":%d,"stream":true}' % (
            model.encode(), i, max_tokens)
        head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
        writer.write(head + b"content-type: application/json\r\ncontent-length: %d\r\n\r\n"
                     % len(body) + body)
        tail = b""
        while data := await reader.read(65536):
            buf = tail + data
            counts[0] += buf.count(FRAME)
            tail = buf[-4:]
        writer.close()
        counts[1] += 1
async def main(port, n, max_tokens, model):
    counts = [0, 0]
    tasks = [asyncio.create_task(one(port, i, max_tokens, model, counts)) for i in range(n)]
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, sys.stdin.readline):
        print(json.dumps({"frames": counts[0], "ended": counts[1]}), flush=True)
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
"""


@dataclass(frozen=True, slots=True)
class Plan:
    """What one run measures; ``stream_*`` names are the ones ``bench.streams._open`` reads."""

    processes: tuple[int, ...] = (1, 2)
    reps: int = 3
    relay_streams: int = 64
    relay_tps: float = 1000.0
    relay_workers: int = 2
    relay_warm_s: float = 5.0
    relay_seconds: float = 10.0
    hold: tuple[int, ...] = (1000, 2000, 4000)
    hold_reps: int = 2
    hold_s: float = 15.0
    stream_ramp_per_s: float = 500.0
    stream_sample: int = 200
    stream_ping_s: float = 5.0


TINY = Plan(
    reps=1,
    relay_streams=8,
    relay_tps=200.0,
    relay_workers=1,
    relay_warm_s=1.0,
    relay_seconds=2.0,
    hold=(40,),
    hold_reps=1,
    hold_s=2.0,
    stream_sample=10,
)


class _Client:
    """The lean load generator of the relay experiment, in a process of its own."""

    def __init__(self, port: int, streams: int, max_tokens: int) -> None:
        args = [PYTHON, "-c", CLIENT, str(port), str(streams), str(max_tokens), MODEL]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def counts(self) -> dict[str, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def cpu_seconds(self) -> float:
        t = psutil.Process(self.proc.pid).cpu_times()
        return float(t.user + t.system)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent not idle (every process, ours or not)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def _gateway_tree(arm: SlipstreamArm) -> list[psutil.Process]:
    """The gateway's processes: the supervisor (or the only process) and its children."""
    assert arm.gateway is not None
    try:
        root = psutil.Process(arm.gateway.pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _read(procs: list[psutil.Process], fn: Callable[[psutil.Process], T]) -> list[T]:
    """``fn`` of each process still there (one that exited in between is left out)."""
    out = []
    for proc in procs:
        try:
            out.append(fn(proc))
        except psutil.Error:
            continue
    return out


def _serving(arm: SlipstreamArm) -> list[psutil.Process]:
    """The processes that accept and relay: the supervisor's children, or the only one."""
    tree = _gateway_tree(arm)
    return tree[1:] or tree


def _gateway_rss(arm: SlipstreamArm) -> int:
    return sum(_read(_gateway_tree(arm), lambda p: int(p.memory_info().rss)))


def _gateway_uss(arm: SlipstreamArm) -> int:
    """Memory only the gateway's processes hold (RSS counts the pages a forked child still
    shares with its supervisor once per process)."""
    return sum(_read(_gateway_tree(arm), lambda p: int(p.memory_full_info().uss)))


def _child_cpu(arm: SlipstreamArm) -> dict[int, float]:
    """CPU seconds of each serving gateway process, by pid."""
    return dict(_read(_serving(arm), lambda p: (p.pid, float(sum(p.cpu_times()[:2])))))


def _streams_per_process(arm: SlipstreamArm) -> list[int]:
    """Client connections each serving gateway process holds (which process accepted what)."""

    def held(proc: psutil.Process) -> int:
        conns = proc.net_connections(kind="tcp")
        return sum(
            1 for c in conns if c.laddr and c.laddr.port == arm.port and c.status == "ESTABLISHED"
        )

    return _read(_serving(arm), held)


async def _start(arm: SlipstreamArm, n: int) -> None:
    """The arm has had one ``/readyz`` answer (from whichever process was ready first); wait
    until the supervisor has forked all N, then 2 s for each to build its app and connect."""

    async def children_ready() -> bool:
        return n == 1 or len(_gateway_tree(arm)) - 1 >= n

    await wait_until(children_ready, timeout=60, what=f"{n} gateway processes")
    await asyncio.sleep(2.0)


def _arm(plan: Plan, n: int, fleet: list[Backend], workdir: Path) -> SlipstreamArm:
    env = {
        "SLIPSTREAM_GATEWAY_PROCESSES": str(n),
        "SLIPSTREAM_MAX_TOKENS_CAP": "10000000",
        "SLIPSTREAM_SSE_PING_S": str(plan.stream_ping_s),
    }
    return SlipstreamArm(fleet, workdir, gateway_env=env)


async def relay_once(plan: Plan, n: int, workdir: Path) -> dict[str, Any]:
    """One saturated relay run with ``n`` gateway processes."""
    per_worker = -(-plan.relay_streams // plan.relay_workers)
    fleet = [
        Backend(f"fast-{i}", slots=per_worker + 8, tokens_per_s=plan.relay_tps, ttft_ms=0.0)
        for i in range(plan.relay_workers)
    ]
    max_tokens = int(plan.relay_tps * (plan.relay_warm_s + plan.relay_seconds + 60))
    async with _arm(plan, n, fleet, workdir) as arm:
        assert isinstance(arm, SlipstreamArm)
        await _start(arm, n)
        client = _Client(arm.port, plan.relay_streams, max_tokens)
        try:
            await asyncio.sleep(plan.relay_warm_s)
            arm.group.mark_cpu()
            child0, c0, own0 = _child_cpu(arm), client.cpu_seconds(), own_cpu_seconds()
            busy0 = _busy_seconds()
            first, t0 = client.counts(), time.monotonic()
            await asyncio.sleep(plan.relay_seconds)
            last, took = client.counts(), time.monotonic() - t0
            cpu = arm.group.cpu_since_mark()
            busy = _busy_seconds() - busy0
            cpu["client"] = client.cpu_seconds() - c0
            cpu["harness"] = own_cpu_seconds() - own0
            child1 = _child_cpu(arm)
            conns = _streams_per_process(arm)
        finally:
            client.close()
    tokens = last["frames"] - first["frames"]
    per_process = [round((child1[p] - child0.get(p, 0.0)) / took, 2) for p in sorted(child1)]
    return _relay_row(n, tokens, took, cpu, per_process) | {
        "streams_ended": last["ended"] - first["ended"],
        "machine_busy_cores": round(busy / took, 2),
        "streams_per_process": conns,
    }


def _relay_row(
    n: int, tokens: int, took: float, cpu: dict[str, float], per_process: list[float]
) -> dict[str, Any]:
    total = sum(cpu.values())
    gateway = cpu.get("gateway", 0.0)
    per_token = {k: round(v * 1e6 / max(1, tokens), 1) for k, v in cpu.items()}
    return {
        "processes": n,
        "seconds": round(took, 2),
        "tokens_per_s": round(tokens / took),
        "gateway_cores": round(gateway / took, 2),
        "all_cores": round(total / took, 2),
        "gateway_share": round(gateway / total, 3) if total else None,
        "tokens_per_core_used": round(tokens / total) if total else None,
        "gateway_us_per_token": per_token.get("gateway"),
        "tokens_per_gateway_core": round(tokens / gateway) if gateway else None,
        "cores": {k: round(v / took, 2) for k, v in cpu.items()},
        "us_per_token": per_token,
        "per_process_cores": per_process,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


async def hold_once(plan: Plan, n: int, count: int, workdir: Path) -> dict[str, Any]:
    """Open ``count`` slow streams through ``n`` gateway processes and hold them."""
    fleet = stream_fleet(count)
    ramp_s = count / plan.stream_ramp_per_s
    tokens = int(ramp_s + plan.hold_s + 60)
    async with _arm(plan, n, fleet, workdir) as arm:
        assert isinstance(arm, SlipstreamArm)
        await _start(arm, n)
        baseline, baseline_uss = _gateway_rss(arm), _gateway_uss(arm)
        stop, lags = asyncio.Event(), list[float]()
        lagger = asyncio.create_task(_loop_lag(stop, lags))
        sample = min(count, plan.stream_sample)  # held by ``bench.stamper``, not this loop
        stamper = await Stamper.start(arm.target(), sample, tokens, ramp_s)
        tasks: list[asyncio.Task[Result]] = []
        try:
            results, tasks = await _open(arm.target(), count - sample, plan, tokens)
            opened = await _wait_open(results, 30 + ramp_s)
            opened += await stamper.opened(60 + ramp_s)
            running, start_wait_s = await wait_started(results, tasks, 60 + ramp_s)
            await asyncio.sleep(2.0)  # let the ramp's burst settle
            since = time.time()
            rss, probe, cores = await _hold(arm, plan)
            conns = _streams_per_process(arm)
            sampled = await stamper.finish(since, plan.hold_s)
            latencies = await _delivery(arm, sampled.streams, since)
        finally:
            stop.set()
            await stamper.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, lagger, return_exceptions=True)
    plateau = statistics.median(rss) if rss else 0
    return {
        "processes": n,
        "streams": count,
        "opened": opened,
        "running_of_unsampled": running,  # had their first token before the hold
        "start_wait_s": start_wait_s,
        "errors": sorted({r.error for r in results if r.error} | sampled.errors)[:3],
        "rss_baseline_mb": round(baseline / 2**20, 1),
        "uss_baseline_mb": round(baseline_uss / 2**20, 1),
        "rss_plateau_mb": round(plateau / 2**20, 1),
        "kb_per_stream": round((plateau - baseline) / 1024 / max(1, opened), 2),
        "delivery_p50_ms": _r(percentile(latencies, 50)),
        "delivery_p99_ms": _r(percentile(latencies, 99)),
        "delivery_samples": len(latencies),
        "tokens_per_s_per_stream": round(sampled.tokens_per_s, 3),
        "healthz_p50_ms": _r(probe.get("p50_ms")),
        "healthz_p99_ms": _r(probe.get("p99_ms")),
        "gateway_cores": cores.get("gateway"),
        "machine_busy_cores": cores.get("machine_busy"),
        "cores": cores,
        "streams_per_process": conns,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def _hold(
    arm: SlipstreamArm, plan: Plan
) -> tuple[list[int], dict[str, Any], dict[str, float]]:
    """Sample the gateway's RSS (all its processes) while the probe runs; CPU cores used."""
    probe = asyncio.create_task(_probe(f"{arm.target().base_url}/healthz", plan.hold_s))
    arm.group.mark_cpu()
    own0, busy0, started = own_cpu_seconds(), _busy_seconds(), time.monotonic()
    rss: list[int] = []
    while time.monotonic() < started + plan.hold_s:
        rss.append(_gateway_rss(arm))
        await asyncio.sleep(0.5)
    probed = await probe
    took = time.monotonic() - started
    cores = {k: round(v / took, 2) for k, v in arm.group.cpu_since_mark().items()}
    cores["client"] = round((own_cpu_seconds() - own0) / took, 2)
    cores["machine_busy"] = round((_busy_seconds() - busy0) / took, 2)
    return rss, probed, cores


def _failed(exc: BaseException, **where: Any) -> dict[str, Any]:
    return where | {"failed": f"{type(exc).__name__}: {exc}"[:500]}


async def run(plan: Plan, workdir: Path) -> dict[str, Any]:
    """Both experiments, the arms alternated within each repetition."""
    relay: dict[int, list[dict[str, Any]]] = {n: [] for n in plan.processes}
    for rep in range(plan.reps):
        for n in plan.processes:
            try:
                relay[n].append(await relay_once(plan, n, workdir / f"relay-{n}-{rep}"))
            except (RuntimeError, TimeoutError, OSError) as exc:
                relay[n].append(_failed(exc, processes=n))
    hold: dict[str, list[dict[str, Any]]] = {}
    for count in plan.hold:
        for rep in range(plan.hold_reps):
            for n in plan.processes:
                try:
                    row = await hold_once(plan, n, count, workdir / f"hold-{count}-{n}-{rep}")
                except (RuntimeError, TimeoutError, OSError) as exc:
                    row = _failed(exc, processes=n, streams=count)
                hold.setdefault(f"{n}/{count}", []).append(row)
    return {
        "plan": asdict(plan),
        "relay": {str(n): _median(runs) for n, runs in relay.items()},
        "hold": {key: _median(runs) for key, runs in hold.items()},
        "runs": {"relay": relay, "hold": hold},
    }


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``combine``'s medians; for the per-component dicts, the median of each component (not
    ``combine``'s sum), and the lists of every run kept side by side."""
    ok = [r for r in runs if "failed" not in r]
    out: dict[str, Any] = combine(ok) if ok else {"reps": 0}
    for key in ("cores", "us_per_token"):
        if ok and key in ok[0]:
            names = {k for r in ok for k in r[key]}
            out[key] = {
                k: round(statistics.median(r[key].get(k, 0.0) for r in ok), 2) for k in names
            }
    for key in ("per_process_cores", "streams_per_process", "load_average"):
        if ok and key in ok[0]:
            out[key] = [r[key] for r in ok]
    out["failed"] = [r["failed"] for r in runs if "failed" in r]
    return out


def _hold_order(item: tuple[str, Any]) -> tuple[int, int]:
    n, count = item[0].split("/")
    return int(count), int(n)


def render(result: dict[str, Any]) -> str:
    """The two tables of docs/gateway_processes.md (medians, min-max over the reps)."""

    def fmt(v: float) -> str:
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"

    def cell(row: dict[str, Any], key: str) -> str:
        value, lo, hi = row.get(key), row.get(f"{key}_min"), row.get(f"{key}_max")
        if value is None:
            return "-"
        spread = f" ({fmt(lo)}-{fmt(hi)})" if lo is not None and hi is not None and lo != hi else ""
        return fmt(value) + spread

    lines = [
        "| N | tokens/s | gateway cores | all cores | gateway share | gateway µs/token "
        "| tokens/s per gateway core | cores per gateway process | machine busy cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, row in result["relay"].items():
        runs = row.get("per_process_cores") or []
        per = "; ".join(" + ".join(f"{c:g}" for c in run) for run in runs)
        keys = ("tokens_per_s", "gateway_cores", "all_cores", "gateway_share")
        cells = [cell(row, k) for k in (*keys, "gateway_us_per_token", "tokens_per_gateway_core")]
        busy = cell(row, "machine_busy_cores")
        lines.append(f"| {n} | {' | '.join(cells)} | {per} | {busy} |")
    lines += [
        "",
        "| N | streams | opened | KB/stream | gateway RSS MB (before) "
        "| delivery p50 / p99 ms "
        "| healthz p50 / p99 ms | tokens/s per stream | gateway cores | streams per process "
        "| machine busy cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in sorted(result["hold"].items(), key=_hold_order):
        n, count = key.split("/")
        split = "; ".join(" + ".join(map(str, run)) for run in row.get("streams_per_process", []))
        lines.append(
            f"| {n} | {count} | {cell(row, 'opened')} | {cell(row, 'kb_per_stream')} "
            f"| {cell(row, 'rss_plateau_mb')} ({cell(row, 'rss_baseline_mb')}) "
            f"| {cell(row, 'delivery_p50_ms')} / {cell(row, 'delivery_p99_ms')} "
            f"| {cell(row, 'healthz_p50_ms')} / {cell(row, 'healthz_p99_ms')} "
            f"| {cell(row, 'tokens_per_s_per_stream')} | {cell(row, 'gateway_cores')} "
            f"| {split} | {cell(row, 'machine_busy_cores')} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    """``--out``, ``--tiny`` and one option per field of ``Plan`` (``--relay-tps 2000``)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/gateway_processes.json"))
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run")
    for f in fields(Plan):
        default = getattr(Plan(), f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, tuple):
            parser.add_argument(flag, type=int, nargs="+", default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    return parser


def _plan(args: argparse.Namespace) -> Plan:
    if args.tiny:
        return TINY
    values: dict[str, Any] = {}
    for f in fields(Plan):
        value = getattr(args, f.name)
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return Plan(**values)


def _tree() -> dict[str, Any]:
    """The commit measured, and the relay files that differed from it (others edit them)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {
        "head": git("rev-parse", "HEAD"),
        "dirty": git("status", "--short", "--", "gateway", "shared"),
    }


def main() -> None:
    args = _parser().parse_args()
    plan = _plan(args)
    machine = describe()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(plan, Path(tmp)))
    result["machine"] = machine | {"load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    result["tree"] = _tree()
    result["command"] = "flock /tmp/slipstream-bench.lock .venv/bin/python -m " + " ".join(
        ["bench.gateway_processes", *sys.argv[1:]]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))


if __name__ == "__main__":
    main()
