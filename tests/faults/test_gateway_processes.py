"""``slipstream gateway --processes 2``: two gateway processes on one port.

Real processes: a redis-server, a sim worker, and the gateway supervisor with its two forked
children. Each child also listens on its own metrics port (``--metrics-port``), which the test
uses to reach a chosen process: a stream started on one is resumed and cancelled on the other.
One child is killed with ``kill -9`` mid-stream: its clients resume through the shared port,
the other child's streams are undisturbed, and the supervisor starts a replacement.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.faults.cluster import (
    StreamRecord,
    check_stream,
    resume,
    stream_completion,
    wait_frames,
)
from tests.helpers import RedisProcess, free_port, start_redis, wait_for_port
from worker.engines.sim import greedy_text

pytestmark = pytest.mark.timeout(90)


@dataclass
class Gateways:
    supervisor: subprocess.Popen[bytes]
    port: int
    metrics_port: int

    def base(self, index: int | None = None) -> str:
        port = self.port if index is None else self.metrics_port + index
        return f"http://127.0.0.1:{port}"

    def children(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.supervisor.pid)], capture_output=True, text=True
        )
        return sorted(int(p) for p in out.stdout.split())

    def pid_on(self, index: int) -> int:
        """The child listening on ``metrics_port + index`` (from /proc: its socket inode)."""
        wanted = f":{self.metrics_port + index:04X} "
        inodes = set()
        with open("/proc/net/tcp") as table:
            for line in table.readlines()[1:]:
                fields = line.split()
                if fields[1].endswith(wanted.strip()) and fields[3] == "0A":  # LISTEN
                    inodes.add(fields[9])
        for pid in self.children():
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        return pid
        raise LookupError(f"no child listens on {self.metrics_port + index}")


def two_free_ports() -> int:
    """A port p with p + 1 free too (the children's metrics ports)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture
def stack() -> Iterator[tuple[RedisProcess, Gateways]]:
    redis = start_redis()
    env = {**os.environ, "REDIS_URL": redis.url, "SLIPSTREAM_LOG_LEVEL": "warning"}
    port, metrics_port = free_port(), two_free_ports()
    cli = [sys.executable, "-m", "slipstream"]
    sim = ["--max-seqs", "32", "--sim-ttft-ms", "5", "--sim-tokens-per-s", "20"]
    worker = subprocess.Popen(
        [*cli, "worker", "--model", "sim-model", "--engine", "sim", *sim],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    supervisor = subprocess.Popen(
        [*cli, "gateway", "--port", str(port), "--model", "sim-model", "--processes", "2"],
        env={**env, "SLIPSTREAM_GATEWAY_METRICS_PORT": str(metrics_port)},
    )
    try:
        for p in (port, metrics_port, metrics_port + 1):
            wait_for_port(p, 30)
        yield redis, Gateways(supervisor, port, metrics_port)
    finally:
        for proc in (supervisor, worker):
            proc.send_signal(signal.SIGTERM)
        for proc in (supervisor, worker):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        redis.stop(kill=True)


async def requests_served(gw: Gateways, index: int) -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"{gw.base(index)}/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("slipstream_gateway_requests_total{")
    )


async def test_two_processes_share_the_port_and_the_jobs(
    stack: tuple[RedisProcess, Gateways],
) -> None:
    """A stream started on process 0 is resumed and then cancelled through process 1."""
    _, gw = stack
    assert len(gw.children()) == 2
    assert gw.pid_on(0) != gw.pid_on(1)
    record = StreamRecord()
    first = asyncio.create_task(
        stream_completion(
            gw.base(0),
            "across processes",
            400,
            record,
            stop_after=4,
            headers={"X-Cancel-On-Disconnect": "false"},
        )
    )
    await first  # read a few events from process 0, then hang up (the job keeps running)
    headers = {"Last-Event-ID": str(record.ids()[-1])}
    async with (
        httpx.AsyncClient(base_url=gw.base(1), timeout=30) as client,
        client.stream("GET", f"/v1/jobs/{record.job_id}/events", headers=headers) as resp,
    ):
        assert resp.status_code == 200
        lines = resp.aiter_lines()
        async for line in lines:  # process 1 relays the job's next event
            if line.startswith("id: "):
                assert int(line[4:]) == record.ids()[-1] + 1
                break
        async with httpx.AsyncClient(base_url=gw.base(0), timeout=10) as other:
            cancelled = await other.delete(f"/v1/jobs/{record.job_id}")  # on process 0
        assert cancelled.status_code == 200, cancelled.text
        tail = [line async for line in lines if line.startswith("data: ")]
    assert tail[-1] == "data: [DONE]"
    assert "cancel" in "".join(tail[-3:])
    # each process counts its own: the completion went to process 0 only
    assert [await requests_served(gw, i) for i in (0, 1)] == [1, 0]


async def test_kill_one_process_mid_stream(stack: tuple[RedisProcess, Gateways]) -> None:
    """kill -9 one child while streams run on both: the other child's streams never notice,
    the killed one's clients resume through the shared port, and a new child takes its slot."""
    _, gw = stack
    victim = gw.pid_on(0)
    prompts = [f"process kill {i}" for i in range(12)]
    records = [StreamRecord() for _ in prompts]
    tasks = [
        asyncio.create_task(stream_completion(gw.base(i % 2), p, 80, r, timeout=60))
        for i, (p, r) in enumerate(zip(prompts, records, strict=True))
    ]
    await asyncio.gather(*(wait_frames(r, 3) for r in records))
    os.kill(victim, signal.SIGKILL)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    broken = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert broken and all(i % 2 == 0 for i in broken), broken  # only the victim's streams
    for i in broken:
        await resume(gw.base(), records[i])  # the shared port: the surviving process
    for prompt, record in zip(prompts, records, strict=True):
        check_stream(record, greedy_text(prompt, 80))
    end = time.monotonic() + 15
    while time.monotonic() < end:
        with contextlib.suppress(LookupError):
            if gw.pid_on(0) != victim:
                break
        await asyncio.sleep(0.2)
    assert gw.pid_on(0) != victim and len(gw.children()) == 2, "no replacement process"
    fresh = StreamRecord()
    await stream_completion(gw.base(0), "after the restart", 10, fresh)
    check_stream(fresh, greedy_text("after the restart", 10))
