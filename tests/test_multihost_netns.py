"""Workers on other hosts, for real: Linux network namespaces joined by veth pairs.

"hub" runs Redis and the gateway; "hostA" and "hostB" each run a worker that reaches Redis
over its own link (10.213.1.0/24, 10.213.2.0/24 — addresses that exist only inside the
namespaces made here). HTTP requests are sent from inside the hub; the test reads Redis over
a unix socket, so no traffic leaves the namespaces. Then hostA's link is cut: its worker drops
out of the registry, its running jobs go to hostB, and new jobs keep flowing on hostB.
Everything (processes, namespaces, links) is torn down in ``finally``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.asyncio import Redis

from shared.fleet import live_workers
from shared.jobs import JobStore, now_ms
from shared.keys import Keys
from shared.redis import connect
from slipstream.janitor import clean_dead_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = os.path.join(ROOT, "tests", "netns_client.py")
FAST = {
    "SLIPSTREAM_HEARTBEAT_S": "0.1",
    "SLIPSTREAM_LEASE_S": "0.6",
    "SLIPSTREAM_WORKER_TTL_S": "1.0",
    "SLIPSTREAM_LOG_LEVEL": "warning",
}
TTL_S = 1.0
GATEWAY = "http://127.0.0.1:8000"
pytestmark = pytest.mark.slow


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def namespaces_work() -> str | None:
    """None when this machine can make network namespaces; else why not."""
    if shutil.which("ip") is None:
        return "iproute2 (the ip command) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"slprobe{secrets.token_hex(3)}"
    try:
        ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"ip netns add failed: {getattr(exc, 'stderr', b'') or exc!r}"
    ip("netns", "del", probe)
    return None


@dataclass
class Topology:
    """hub <-> hostA and hub <-> hostB, each over its own veth pair."""

    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    made: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    tmp: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="slip-netns-"))

    def ns(self, role: str) -> str:
        return f"sl{role}{self.suffix}"

    def veth(self, host: str, side: str) -> str:
        return f"v{side}{host}{self.suffix}"  # e.g. vhA3f2a1c (hub side), vxA3f2a1c

    def build(self) -> None:
        for role in ("hub", "A", "B"):
            ip("netns", "add", self.ns(role))
            self.made.append(self.ns(role))
            ip("-n", self.ns(role), "link", "set", "lo", "up")
        for host, net in (("A", 1), ("B", 2)):
            hub_end, host_end = self.veth(host, "h"), self.veth(host, "x")
            ip(
                "-n",
                self.ns("hub"),
                "link",
                "add",
                hub_end,
                "type",
                "veth",
                "peer",
                "name",
                host_end,
                "netns",
                self.ns(host),
            )
            ip("-n", self.ns("hub"), "addr", "add", f"10.213.{net}.1/24", "dev", hub_end)
            ip("-n", self.ns(host), "addr", "add", f"10.213.{net}.2/24", "dev", host_end)
            ip("-n", self.ns("hub"), "link", "set", hub_end, "up")
            ip("-n", self.ns(host), "link", "set", host_end, "up")

    def cut(self, host: str) -> None:
        """Pull the cable: the hub's end of the host's link goes away."""
        ip("-n", self.ns("hub"), "link", "del", self.veth(host, "h"))

    def run(
        self, role: str, args: list[str], env: dict[str, str], *, quiet: bool = False
    ) -> subprocess.Popen[bytes]:
        cmd = ["ip", "netns", "exec", self.ns(role), *args]
        out = subprocess.DEVNULL if quiet else None
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, cwd=ROOT, stdout=out)
        self.procs.append(proc)
        return proc

    def client(self, *args: str) -> Any:
        cmd = ["ip", "netns", "exec", self.ns("hub"), sys.executable, CLIENT, *args]
        out = subprocess.run(cmd, check=True, capture_output=True, timeout=90, cwd=ROOT)
        return json.loads(out.stdout)

    def teardown(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def redis_socket(self) -> str:
        return os.path.join(self.tmp, "redis.sock")


@pytest.fixture
def topology() -> Iterator[Topology]:
    reason = namespaces_work()
    if reason is not None:
        pytest.skip(f"cannot create network namespaces here: {reason}")
    topo = Topology()
    try:
        topo.build()
        yield topo
    finally:
        topo.teardown()


def start_hub(topo: Topology) -> None:
    server = shutil.which("redis-server")
    assert server, "redis-server must be installed"
    args = [server, "--port", "6379", "--bind", "127.0.0.1", "10.213.1.1", "10.213.2.1"]
    args += ["--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", topo.tmp]
    args += ["--unixsocket", topo.redis_socket, "--unixsocketperm", "700"]
    topo.run("hub", args, {}, quiet=True)
    end = time.monotonic() + 10
    while not os.path.exists(topo.redis_socket):
        assert time.monotonic() < end, "redis-server did not start in the hub"
        time.sleep(0.05)
    env = {**FAST, "REDIS_URL": "redis://127.0.0.1:6379/0"}
    topo.run("hub", [sys.executable, "-m", "slipstream", "gateway", "--model", "sim-model"], env)
    assert topo.client("wait", "--base", GATEWAY)["ready"], "the gateway did not start"


def start_worker(topo: Topology, host: str, net: int) -> str:
    worker_id = f"host{host}-{topo.suffix}"
    env = {**FAST, "REDIS_URL": f"redis://10.213.{net}.1:6379/0"}
    args = [sys.executable, "-m", "slipstream", "worker", "--engine", "sim"]
    args += ["--model", "sim-model", "--worker-id", worker_id, "--sim-tokens-per-s", "100"]
    topo.run(host, args, env)
    return worker_id


@pytest.fixture
async def redis(topology: Topology) -> AsyncIterator[Redis]:
    start_hub(topology)
    client = connect(f"unix://{topology.redis_socket}")
    yield client
    await client.aclose()


async def live_ids(redis: Redis) -> set[str]:
    return {w.id for w in await live_workers(redis, Keys(), TTL_S)}


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def owners(redis: Redis, results: list[dict[str, Any]]) -> list[str]:
    store = JobStore(redis, Keys(), ttl_s=60)
    return [(await store.state("sim-model", r["job_id"])).get("owner", "") for r in results]


async def test_workers_on_two_hosts_and_a_cut_link(topology: Topology, redis: Redis) -> None:
    a = start_worker(topology, "A", 1)
    b = start_worker(topology, "B", 2)

    async def both_live() -> bool:
        return await live_ids(redis) == {a, b}

    await wait_for(both_live, 20, "both hosts' workers in the registry")
    first = await asyncio.to_thread(topology.client, "send", "--base", GATEWAY, "--n", "24")
    assert [r["status"] for r in first] == [200] * 24
    assert all(r["words"] == 8 for r in first)
    assert set(await owners(redis, first)) == {a, b}, "jobs did not reach both hosts"

    long_jobs = asyncio.create_task(
        asyncio.to_thread(
            topology.client, "send", "--base", GATEWAY, "--n", "8", "--max-tokens", "150"
        )
    )
    await wait_for(lambda: running_on(redis, a), 15, "a long job running on hostA")
    topology.cut("A")
    cut_at = now_ms()

    async def only_b() -> bool:
        return await live_ids(redis) == {b}

    await wait_for(only_b, 2 * TTL_S + 3, "hostA to drop out of the registry")
    removed = await clean_dead_workers(redis, Keys(), now_ms() - int(TTL_S * 1000))
    assert removed == [a] and not await redis.hexists(Keys().workers, a)  # type: ignore[misc]

    after = await asyncio.to_thread(topology.client, "send", "--base", GATEWAY, "--n", "12")
    assert [r["status"] for r in after] == [200] * 12
    assert set(await owners(redis, after)) == {b}, "new jobs must go to the host still up"

    survivors = await long_jobs
    finished_by = await owners(redis, survivors)
    print(
        f"\nlong jobs across the cut (ms {cut_at}): statuses "
        f"{[r['status'] for r in survivors]}, words {[r['words'] for r in survivors]}, "
        f"finished by {finished_by}"
    )
    # the cut host's in-flight jobs were taken over (lease expiry) and finished on hostB
    assert [r["status"] for r in survivors] == [200] * 8
    assert all(r["words"] == 150 for r in survivors)
    assert set(finished_by) == {b}


async def running_on(redis: Redis, worker_id: str) -> bool:
    """Some job is running on ``worker_id`` (its owner) right now."""
    leases = await redis.zrange(Keys().leases("sim-model"), 0, -1)
    store = JobStore(redis, Keys(), ttl_s=60)
    for job_id in leases:
        state = await store.state("sim-model", job_id)
        if state.get("owner") == worker_id and state.get("state") == "running":
            return True
    return False
