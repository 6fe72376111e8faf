"""Overload benchmark: steady load at 0.7 of capacity, a burst at 2x, back to 0.7.

    python -m bench.overload [--burst-s 30] [--steady-s 20] [--no-admission] [--json out.json]

Starts its own redis-server, one gateway and ``--workers`` simulated workers (processes), then
sends open-loop Poisson arrivals of streaming ``/v1/completions`` requests, 20% of them high
priority, every one with a deadline (``X-Deadline-Ms``). Capacity is known exactly from the
simulator: workers x max_seqs x max_tokens / (TTFT + max_tokens / tokens_per_s) tokens/s.

Each request ends as: served within its deadline, served late, rejected early (429; the time
to the 429 is measured), timed out (504, or a ``deadline_exceeded`` error mid-stream), or error.
Goodput is the tokens of requests served within their deadline, counted where they arrived in
time, during the burst, as a share of capacity. Wasted tokens are those streamed to requests
that then missed their deadline, as a share of all tokens streamed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

MODEL = "sim-model"


@dataclass(frozen=True)
class Config:
    workers: int = 2
    max_seqs: int = 8
    tokens_per_s: float = 20.0
    ttft_ms: float = 20.0
    max_tokens: int = 40
    deadline_ms: int = 6000
    high_share: float = 0.2
    steady_s: float = 20.0
    burst_s: float = 30.0
    steady_load: float = 0.7
    burst_load: float = 2.0
    admission: bool = True
    seed: int = 7

    @property
    def capacity_tokens_per_s(self) -> float:
        slot_s = self.ttft_ms / 1000 + self.max_tokens / self.tokens_per_s
        return self.workers * self.max_seqs * self.max_tokens / slot_s

    @property
    def capacity_rps(self) -> float:
        return self.capacity_tokens_per_s / self.max_tokens


@dataclass
class Outcome:
    sent: float
    priority: str
    deadline_s: float
    status: int = 0
    kind: str = "error"  # ontime | late | rejected | timeout | error
    headers_s: float = 0.0
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    retry_after: str = ""


# --- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


@contextmanager
def cluster(cfg: Config) -> Iterator[str]:
    """redis-server, a gateway and the workers; yields the gateway's base URL."""
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is needed (apt-get install redis-server)")
    rport, gport = free_port(), free_port()
    workdir = tempfile.mkdtemp(prefix="slip-overload-")
    procs = [subprocess.Popen([server, "--port", str(rport), "--save", "", "--dir", workdir],
                              stdout=subprocess.DEVNULL)]  # fmt: skip
    env = {
        **os.environ,
        "REDIS_URL": f"redis://127.0.0.1:{rport}/0",
        "SLIPSTREAM_MODELS": MODEL,
        "SLIPSTREAM_LOG_LEVEL": "warning",
        "SLIPSTREAM_ADMISSION": "true" if cfg.admission else "false",
        "SLIPSTREAM_MAX_QUEUE_JOBS": "0",
    }
    try:
        wait_port(rport)
        slip = [sys.executable, "-m", "slipstream"]
        procs.append(subprocess.Popen([*slip, "gateway", "--port", str(gport)], env=env))
        for i in range(cfg.workers):
            args = [*slip, "worker", "--model", MODEL, "--worker-id", f"w{i}"]
            args += ["--max-seqs", str(cfg.max_seqs), "--sim-tokens-per-s", str(cfg.tokens_per_s)]
            args += ["--sim-ttft-ms", str(cfg.ttft_ms)]
            procs.append(subprocess.Popen(args, env=env))
        wait_port(gport)
        yield f"http://127.0.0.1:{gport}"
    finally:
        for proc in reversed(procs):  # workers and gateway first, Redis last
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)


# --- load -------------------------------------------------------------------------------------


def arrivals(cfg: Config) -> list[tuple[float, str]]:
    """(offset s, priority) of every request: Poisson arrivals at each phase's rate."""
    rng = random.Random(cfg.seed)
    phases = [
        (cfg.steady_s, cfg.steady_load),
        (cfg.burst_s, cfg.burst_load),
        (cfg.steady_s, cfg.steady_load),
    ]
    out, start = [], 0.0
    for length, load in phases:
        t = start
        while True:
            t += rng.expovariate(load * cfg.capacity_rps)
            if t >= start + length:
                break
            out.append((t, "high" if rng.random() < cfg.high_share else "normal"))
        start += length
    return out


async def one(client: httpx.AsyncClient, base: str, cfg: Config, priority: str) -> Outcome:
    out = Outcome(sent=time.monotonic(), priority=priority, deadline_s=cfg.deadline_ms / 1000)
    body = {"model": MODEL, "prompt": "tell me a story", "max_tokens": cfg.max_tokens}
    headers = {"X-Priority": priority, "X-Deadline-Ms": str(cfg.deadline_ms)}
    try:
        async with client.stream(
            "POST", f"{base}/v1/completions", json={**body, "stream": True}, headers=headers
        ) as response:
            out.status = response.status_code
            out.headers_s = time.monotonic() - out.sent
            out.retry_after = response.headers.get("retry-after", "")
            if response.status_code != 200:
                await response.aread()
                out.kind = {429: "rejected", 504: "timeout"}.get(response.status_code, "error")
                return out
            await read_stream(response, out)
    except httpx.HTTPError:
        out.kind = "error"
    return out


async def read_stream(response: httpx.Response, out: Outcome) -> None:
    async for line in response.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            code = chunk["error"].get("code")
            out.kind = "timeout" if code == "deadline_exceeded" else "error"
            return
        choice = chunk["choices"][0]
        if choice.get("text"):
            now = time.monotonic()
            out.first = out.first or now
            out.last = now
            out.tokens += 1
        if choice.get("finish_reason"):
            end = out.last or time.monotonic()
            out.kind = "ontime" if end - out.sent <= out.deadline_s else "late"


async def run_load(base: str, cfg: Config) -> tuple[list[Outcome], float]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        for _ in range(3):  # warm the path (imports, connections) before the clock starts
            await one(client, base, cfg, "normal")
        t0 = time.monotonic()
        tasks = []
        for offset, priority in arrivals(cfg):
            delay = t0 + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, base, cfg, priority)))
        return list(await asyncio.gather(*tasks)), t0


# --- figures ----------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def tokens_in(o: Outcome, start: float, end: float) -> float:
    """Tokens of ``o`` that arrived in [start, end), spread evenly over its stream."""
    if o.first is None or o.last is None or o.tokens == 0:
        return 0.0
    if o.last == o.first:
        return float(o.tokens) if start <= o.first < end else 0.0
    overlap = max(0.0, min(end, o.last) - max(start, o.first))
    return o.tokens * overlap / (o.last - o.first)


@dataclass
class Report:
    config: dict[str, Any]
    requests: int
    shares: dict[str, float]
    time_to_429_ms: dict[str, float]
    goodput_burst: float
    wasted_token_share: float
    high_attainment: float
    retry_after_values: list[str] = field(default_factory=list)


def summarize(outcomes: list[Outcome], t0: float, cfg: Config) -> Report:
    n = len(outcomes)
    kinds = ["ontime", "late", "rejected", "timeout", "error"]
    shares = {k: sum(o.kind == k for o in outcomes) / n for k in kinds}
    rejected = [o.headers_s * 1000 for o in outcomes if o.kind == "rejected"]
    b0, b1 = t0 + cfg.steady_s, t0 + cfg.steady_s + cfg.burst_s
    good = sum(tokens_in(o, b0, b1) for o in outcomes if o.kind == "ontime")
    streamed = sum(o.tokens for o in outcomes)
    wasted = sum(o.tokens for o in outcomes if o.kind in ("timeout", "late"))
    high = [o for o in outcomes if o.priority == "high"]
    return Report(
        config=asdict(cfg) | {"capacity_tokens_per_s": round(cfg.capacity_tokens_per_s, 1)},
        requests=n,
        shares={k: round(v, 4) for k, v in shares.items()},
        time_to_429_ms={"p50": round(pct(rejected, 0.5), 2), "p99": round(pct(rejected, 0.99), 2)},
        goodput_burst=round(good / (cfg.capacity_tokens_per_s * cfg.burst_s), 4),
        wasted_token_share=round(wasted / streamed, 4) if streamed else 0.0,
        high_attainment=round(sum(o.kind == "ontime" for o in high) / len(high), 4) if high else 1,
        retry_after_values=sorted({o.retry_after for o in outcomes if o.retry_after}, key=int),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steady-s", type=float, default=20.0)
    parser.add_argument("--burst-s", type=float, default=30.0)
    parser.add_argument("--deadline-ms", type=int, default=6000)
    parser.add_argument("--tokens-per-s", type=float, default=20.0, help="of one sequence")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--no-admission", action="store_true", help="baseline: admit all")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    cfg = Config(
        workers=args.workers,
        steady_s=args.steady_s,
        burst_s=args.burst_s,
        deadline_ms=args.deadline_ms,
        tokens_per_s=args.tokens_per_s,
        max_tokens=args.max_tokens,
        admission=not args.no_admission,
    )
    with cluster(cfg) as base:
        outcomes, t0 = asyncio.run(run_load(base, cfg))
    report = json.dumps(asdict(summarize(outcomes, t0, cfg)), indent=2)
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
