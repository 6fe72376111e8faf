"""The streams experiment's latency sample, in a process of its own: opens ``--streams`` SSE
streams spread over ``--ramp-s`` and stamps each token's arrival (wall clock, SSE id).

    python -m bench.stamper --url http://127.0.0.1:8000 --streams 200 --tokens 120 --ramp-s 20

Stamped in the load generator itself, which holds the other thousands of streams, a token's
arrival was late by that process's own event-loop lag (p99 ~300 ms at 10,000 streams on this
machine, against a gateway that had delivered it in ms): the figure was the load generator's,
not the gateway's. Here the sampled streams are all this loop holds. It runs until its stdin
closes. It prints one line once every stream has its response head (or failed), then, at
the end, one JSON list: per stream, its HTTP status, error, job id and ``[id, wall]`` stamps.
``Stamper`` is the experiment's handle on the process (``bench.streams``,
``bench.gateway_processes``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from bench.client import Stamps, Target, one_request
from bench.process import PYTHON
from bench.result import Result
from bench.trace import TraceRequest


@dataclass
class Sample:
    """What the stamper's streams saw over the hold."""

    streams: list[tuple[str | None, Stamps]] = field(default_factory=list)  # (job id, stamps)
    tokens_per_s: float = 0.0  # per open stream, over the hold
    errors: set[str] = field(default_factory=set)  # of the streams that did not open


class Stamper:
    """A running ``bench.stamper`` process: ``start`` it with the ramp, wait until its streams
    are ``opened``, ``finish`` it after the hold; ``close`` in any case (kills it if need be)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, target: Target, streams: int, tokens: int, ramp_s: float) -> Stamper:
        args = ["--url", target.base_url, "--streams", str(streams), "--tokens", str(tokens)]
        proc = await asyncio.create_subprocess_exec(
            PYTHON,
            "-m",
            "bench.stamper",
            *args,
            "--ramp-s",
            str(ramp_s),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def opened(self, timeout: float) -> int:
        """Once every stream has its head: how many opened (status 200)."""
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"bench.stamper exited early (status {await self.proc.wait()})")
        return int(json.loads(line)["open"])

    async def finish(self, since: float, hold_s: float) -> Sample:
        """Stop it; its open streams' stamps and rate over ``[since, since + hold_s)`` (wall)."""
        out, _ = await asyncio.wait_for(self.proc.communicate(b""), 60)
        if self.proc.returncode != 0:
            raise RuntimeError(f"bench.stamper failed (status {self.proc.returncode})")
        rows: list[dict[str, Any]] = json.loads(out)
        ok = [r for r in rows if r["status"] == 200]
        streams = [(r["job_id"], [(int(i), w) for i, w in r["stamps"]]) for r in ok]
        held = sum(1 for _, s in streams for _, w in s if since <= w < since + hold_s)
        errors = {r["error"] or f"HTTP {r['status']}" for r in rows if r["status"] != 200}
        return Sample(streams, held / hold_s / max(1, len(ok)), errors)

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def stamp(args: argparse.Namespace) -> list[dict[str, object]]:
    target = Target(args.url)
    loop = asyncio.get_running_loop()
    opened: list[tuple[Result, Stamps]] = []
    tasks = []
    t0 = time.perf_counter()
    for i in range(args.streams):
        delay = t0 + i * args.ramp_s / max(1, args.streams) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        req = TraceRequest(i, 0.0, f"sampled {i}", args.tokens, "normal", 3_600_000)
        result = Result(req.idx, req.at_s, req.priority, req.max_tokens, req.deadline_ms)
        stamps: Stamps = []
        opened.append((result, stamps))
        coro = one_request(target, req, t0, timeout_s=3600, stamps=stamps, result=result)
        tasks.append(asyncio.create_task(coro))
    end = time.monotonic() + 30
    while time.monotonic() < end and any(
        not r.status and not t.done() for (r, _), t in zip(opened, tasks, strict=True)
    ):
        await asyncio.sleep(0.1)
    print(json.dumps({"open": sum(1 for r, _ in opened if r.status == 200)}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the experiment says stop
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return [
        {"status": r.status, "error": r.error, "job_id": r.job_id, "stamps": s} for r, s in opened
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--tokens", type=int, required=True, help="max_tokens of each")
    parser.add_argument("--ramp-s", type=float, default=0.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(stamp(args))))


if __name__ == "__main__":
    main()
