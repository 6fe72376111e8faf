"""Where a request's time to first token goes: the overhead experiment's Slipstream arm alone,
with each process's CPU per request and optional py-spy profiles.

    .venv/bin/python -m bench.ttft_profile --requests 1000
    .venv/bin/python -m bench.ttft_profile --requests 1000 --profile /tmp/ttft

Same setup as ``bench.overhead``'s added-TTFT figure: the instant simulator, 8 tokens per
request, one request at a time, the client pinned to CPU 0 and Redis, the gateway and the
worker sharing the others. On this 2-core machine they share **one** core, so a request's TTFT
is close to the CPU that each of them spends before the first token, plus their wake-ups.
Prints TTFT p50/p99 and the CPU µs per request of each process (whole requests: the part
after the first token is in it too). Hardware counters (``perf stat -e instructions``) are not
available in this VM, so CPU time is the figure, and other load on a shared machine inflates
it: compare trees interleaved, several rounds. ``--profile DIR`` writes py-spy raw stacks of
the gateway and the worker (``gateway.txt``, ``workers.txt``; ``--rate`` samples/s).
On one shared core, a process that wakes another is often preempted inside the ``send`` that
woke it, and py-spy counts that time as the sender's: ``--alone gateway`` (or ``workers``)
gives it a CPU of its own (not the experiment's setup) for a profile of its own CPU.
``--gateway-env K=V`` and ``--worker-env K=V`` (repeatable) add to their environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.arms import SlipstreamArm
from bench.client import run_closed
from bench.overhead import INSTANT, pinned, requests
from bench.process import PYTHON
from bench.relay_cpu import py_spy
from bench.stats import summarize


def _spy(pid: int, seconds: float, out: Path, rate: int) -> subprocess.Popen[bytes] | None:
    spy = py_spy()
    if spy is None:
        return None
    args = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds) + 1)]
    args += ["--format", "raw", "--rate", str(rate), "--nonblocking", "--output", str(out)]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _env(pairs: list[str]) -> dict[str, str]:
    return dict(p.split("=", 1) for p in pairs)


def _alone(arm: SlipstreamArm, component: str) -> None:
    """``component``'s processes on the last CPU, the arm's others and this one on the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    mine, rest = {cpus[-1]}, set(cpus[:-1]) or {cpus[-1]}
    for proc in arm.group.procs:
        os.sched_setaffinity(proc.pid, mine if proc.component == component else rest)
    os.sched_setaffinity(0, rest)


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with pinned(not args.alone) as cpus:
        arm = SlipstreamArm(
            [INSTANT],
            workdir,
            cpus,
            gateway_env=_env(args.gateway_env),
            worker_env=_env(args.worker_env),
        )
        async with arm:
            assert arm.gateway is not None
            if args.alone:
                _alone(arm, args.alone)
            target = arm.target()
            await run_closed(target, requests(args.warmup, 8, offset=900_000))
            spies = []
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                seconds = args.requests * 0.004 + 2
                for proc in (arm.gateway, *(p for _, _, p in arm.backends.values())):
                    out = args.profile / f"{proc.component}.txt"
                    spies.append(_spy(proc.pid, seconds, out, args.rate))
            arm.group.mark_cpu()
            results = await run_closed(target, requests(args.requests, 8), concurrency=1)
            cpu = arm.group.cpu_since_mark()
            for spy in spies:
                if spy is not None:
                    spy.wait(timeout=120)
    summary = summarize(results, duration_s=1.0)
    n = max(1, summary["served"])
    return {
        "requests": args.requests,
        "served": summary["served"],
        "ttft_p50_ms": summary["ttft_p50_ms"],
        "ttft_p99_ms": summary["ttft_p99_ms"],
        "e2e_p50_ms": summary["e2e_p50_ms"],
        "cpu_us_per_request": {k: round(v * 1e6 / n) for k, v in cpu.items()},
        "python": PYTHON,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--profile", type=Path, default=None, help="directory for py-spy stacks")
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument(
        "--alone",
        choices=["gateway", "workers", "redis"],
        default=None,
        help="that component alone on the last CPU, everything else on the others: its py-spy "
        "samples are then its own CPU, not time preempted by the processes it woke",
    )
    parser.add_argument("--gateway-env", action="append", default=[], metavar="K=V")
    parser.add_argument("--worker-env", action="append", default=[], metavar="K=V")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(asyncio.run(measure(args, Path(tmp)))))


if __name__ == "__main__":
    main()
