"""Gateway CPU per relayed event: N open streams, one single-token event per stream per tick.

    .venv/bin/python -m bench.relay_cpu --streams 1000 --rate 2 --seconds 10
    .venv/bin/python -m bench.relay_cpu --streams 1000 --rate 2 --profile /tmp/gw.txt
    .venv/bin/python -m bench.relay_cpu --streams 1000 --rate 2 --split 3 --pin

Starts the Slipstream arm (Redis, one gateway, one simulated worker) and a lean client in a
separate process that opens ``--streams`` SSE streams and only counts frames. The worker's
simulator makes ``--rate`` tokens/s per stream, slow enough that every event carries one token
(the figure is per event, not flattered by coalescing). Over ``--seconds`` of steady state it
reports the gateway's CPU µs per event (its CPU time over the events the client received).
``--profile`` runs ``py-spy record`` on the gateway for the window (raw collapsed stacks: the
``--profile`` file sorted by own time is the profile quoted in docs/benchmarks.md).
``--pin`` puts the gateway on the last CPU and everything else on the others.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.arms import SlipstreamArm
from bench.fleet import MODEL, Backend
from bench.process import PYTHON, gateway_split

CLIENT = r"""
import asyncio, json, sys, time
FRAME = b"\nid: "
async def one(port, i, counts):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b'{"model":"%s","prompt":"s %d","max_tokens":4000,"stream":true}' % (
        sys.argv[3].encode(), i)
    head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    writer.write(head + b"content-length: %d\r\n\r\n" % len(body) + body)
    tail = b""
    while data := await reader.read(65536):
        buf = tail + data
        counts[0] += buf.count(FRAME)
        tail = buf[-4:]
async def main(port, n):
    counts = [0]
    tasks = [asyncio.create_task(one(port, i, counts)) for i in range(n)]
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, sys.stdin.readline):
        print(json.dumps({"frames": counts[0], "t": time.monotonic()}), flush=True)
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


class _Client:
    def __init__(self, port: int, streams: int, cpus: frozenset[int] | None) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-c", CLIENT, str(port), str(streams), MODEL],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )

    def frames(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return int(json.loads(self.proc.stdout.readline())["frames"])

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def py_spy() -> str | None:
    """py-spy's path (on PATH or in the venv), or None with a line saying it is missing."""
    spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not Path(spy).exists():
        print("profile skipped: py-spy not installed (pip install py-spy)", file=sys.stderr)
        return None
    return spy


def _profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    spy = py_spy()
    if spy is None:
        return None
    args = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds))]
    args += ["--format", "raw", "--rate", "250", "--nonblocking", "--output", str(out)]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    gw_cpus, other_cpus = gateway_split(args.pin)
    fleet = [Backend("streamer", slots=args.streams + 64, tokens_per_s=args.rate, ttft_ms=0.0)]
    arm = SlipstreamArm(
        fleet, workdir, other_cpus, worker_env={"SLIPSTREAM_COALESCE_MS": "0"}, gateway_cpus=gw_cpus
    )
    async with arm:
        assert arm.gateway is not None
        client = _Client(arm.port, args.streams, other_cpus)
        try:
            await asyncio.sleep(args.streams / 400 + 4)  # ramp, then settle
            arm.group.mark_cpu()
            f0, t0 = client.frames(), time.monotonic()
            spy = _profile(arm.gateway.pid, args.seconds, args.profile) if args.profile else None
            await asyncio.sleep(args.seconds)
            frames, took = client.frames() - f0, time.monotonic() - t0
            cpu = arm.group.cpu_since_mark()
            if spy is not None:
                spy.wait(timeout=60)
        finally:
            client.close()
    gw = cpu.get("gateway", 0.0)
    return {
        "streams": args.streams,
        "rate_per_stream": args.rate,
        "seconds": round(took, 2),
        "events": frames,
        "events_per_s": round(frames / took),
        "gateway_cpu_s": round(gw, 3),
        "gateway_us_per_event": round(gw * 1e6 / max(1, frames), 1),
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "pinned": gw_cpus is not None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=2.0, help="tokens/s per stream")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pin", action="store_true", help="gateway on a CPU of its own")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy raw output file")
    parser.add_argument(
        "--split",
        type=int,
        default=0,
        help="N: N pairs of runs at --rate and twice it, alternating, then each pair's "
        "marginal µs per event and fixed CPU ms per second (the gateway's CPU is fixed + "
        "marginal x events, so the per-event figure falls as the event rate grows)",
    )
    args = parser.parse_args()
    if args.split:
        print(json.dumps(split(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(asyncio.run(measure(args, Path(tmp)))))


def split(args: argparse.Namespace) -> dict[str, Any]:
    """Marginal and fixed gateway CPU from ``args.split`` pairs of runs at rates r and 2r."""
    pairs = []
    for _ in range(args.split):
        runs = []
        for rate in (args.rate, 2 * args.rate):
            with tempfile.TemporaryDirectory() as tmp:
                one = argparse.Namespace(**{**vars(args), "rate": rate, "profile": None})
                runs.append(asyncio.run(measure(one, Path(tmp))))
        (low, high) = runs
        cpu = [r["gateway_cpu_s"] / r["seconds"] for r in runs]  # CPU seconds per second
        marginal = (cpu[1] - cpu[0]) / max(1, high["events_per_s"] - low["events_per_s"])
        fixed = cpu[0] - marginal * low["events_per_s"]
        pairs.append(
            {
                "us_per_event": [low["gateway_us_per_event"], high["gateway_us_per_event"]],
                "marginal_us_per_event": round(marginal * 1e6, 1),
                "fixed_ms_per_s": round(fixed * 1e3, 1),
            }
        )
    return {"streams": args.streams, "rates": [args.rate, 2 * args.rate], "pairs": pairs}


if __name__ == "__main__":
    main()
