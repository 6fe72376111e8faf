"""The arms: each starts, serves and stops its own processes on 127.0.0.1.

- ``direct``: the client talks to one ``slipstream sim-server``.
- ``nginx-rr`` / ``nginx-lc``: nginx round-robin / least_conn over one sim-server per backend.
- ``nginx-hash``: nginx ``hash $http_x_session_id consistent`` (sticky sessions).
- ``haproxy``: leastconn with ``maxconn`` = the backend's slots and a queue timeout.
- ``slipstream``: Redis, one gateway process, one pulling worker per backend (same simulator).

Every arm is an async context manager: whatever it started is stopped on the way out.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.client import Target
from bench.config import haproxy_cfg, nginx_conf
from bench.fleet import MODEL, Backend
from bench.process import PYTHON, Proc, ProcessGroup, free_port, terminate, wait_until
from bench.result import Result
from bench.sse import http_json

ARMS = ("direct", "nginx-rr", "nginx-lc", "nginx-hash", "haproxy", "slipstream")
BALANCERS = ("nginx-rr", "nginx-lc", "haproxy", "slipstream")
LABELS = {
    "direct": "direct (no balancer)",
    "nginx-rr": "nginx round-robin",
    "nginx-lc": "nginx least_conn",
    "nginx-hash": "nginx sticky (consistent hash of X-Session-Id)",
    "slipstream-blind": "Slipstream cache-blind",
    "slipstream-warm": "Slipstream warm-aware",
    "oracle-warm": "oracle (knows every cache)",
    "haproxy": "haproxy leastconn+maxconn",
    "slipstream": "Slipstream",
    "slipstream-before": "Slipstream before (BENCH_BASELINE_TREE)",
    "oracle": "oracle (ideal queue)",
}
QUIET = {"SLIPSTREAM_LOG_LEVEL": "warning", "SLIPSTREAM_LOG_FORMAT": "json"}


def available(name: str) -> bool:
    """Whether the arm's software is installed (nginx and haproxy are optional packages)."""
    if name.startswith("nginx"):
        return shutil.which("nginx") is not None
    if name == "haproxy":
        return shutil.which("haproxy") is not None
    if name == "slipstream":
        return shutil.which("redis-server") is not None
    return True


def skipped_arms() -> dict[str, str]:
    """Every arm whose software is missing, with why: recorded in the results and printed in
    the report ("arm skipped: nginx not installed"), so an arm never silently vanishes from
    the tables. ``make bench`` installs nginx and haproxy first (Debian packages)."""
    tools = {"nginx": "nginx", "haproxy": "haproxy", "slipstream": "redis-server"}
    out = {}
    for name in ARMS:
        tool = next((t for prefix, t in tools.items() if name.startswith(prefix)), None)
        if tool is not None and not available(name):
            out[name] = f"arm skipped: {tool} not installed"
    return out


async def http_ok(url: str) -> bool:
    status, _ = await http_json(url, timeout=2.0)
    return status == 200


class Arm:
    """Base: backends are sim-servers; subclasses put a balancer (or nothing) in front."""

    name = "direct"
    component = "backends"

    def __init__(self, fleet: list[Backend], workdir: Path, cpus: frozenset[int] | None = None):
        self.fleet = list(fleet)
        self.workdir = workdir / self.name
        self.cpus = cpus
        self.group = ProcessGroup(self.workdir, env=dict(QUIET))
        self.backends: dict[str, tuple[Backend, int, Proc]] = {}  # name -> (spec, port, proc)
        self.port = 0
        self.actions: list[str] = []  # what the harness had to do on fleet changes

    async def __aenter__(self) -> Arm:
        try:
            await self.start()
        except BaseException:
            self.group.stop_all()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.group.stop_all()

    def target(self) -> Target:
        return Target(f"http://127.0.0.1:{self.port}")

    async def start(self) -> None:
        await self._start_backends(self.fleet[:1])
        self.port = next(iter(self.backends.values()))[1]

    # --- backends -----------------------------------------------------------------------
    def _launch_backend(self, b: Backend) -> Proc:
        port = free_port()
        args = [PYTHON, "-m", "slipstream", "sim-server", "--host", "127.0.0.1"]
        args += ["--port", str(port), "--model", MODEL, "--slots", str(b.slots)]
        args += b.sim_flags()
        proc = self.group.start(b.name, "backends", args, cpus=self.cpus)
        self.backends[b.name] = (b, port, proc)
        return proc

    async def _start_backends(self, fleet: list[Backend]) -> None:
        procs = [self._launch_backend(b) for b in fleet]
        await asyncio.gather(
            *(
                wait_until(
                    lambda port=self.backends[p.name][1]: http_ok(
                        f"http://127.0.0.1:{port}/health"
                    ),
                    timeout=60,
                    what=f"sim-server {p.name}",
                    procs=[p],
                )
                for p in procs
            )
        )

    def _name_of_port(self, port: int) -> str | None:
        return next((n for n, (_, p, _) in self.backends.items() if p == port), None)

    async def attribute(self, results: list[Result]) -> None:
        """Name the backend that served each result (from the X-Backend header here)."""
        only = self.fleet[0].name
        for r in results:
            r.backend = r.backend or only

    async def add_backend(self, b: Backend) -> None:
        raise NotImplementedError(f"{self.name} takes no fleet changes")

    async def remove_backend(self, name: str) -> None:
        raise NotImplementedError(f"{self.name} takes no fleet changes")

    def cpu_procs(self) -> list[Proc]:
        return list(self.group.procs)


class NginxArm(Arm):
    component = "nginx"

    def __init__(
        self,
        fleet: list[Backend],
        workdir: Path,
        cpus: frozenset[int] | None = None,
        *,
        least_conn: bool = False,
        method: str = "",
    ):
        self.method = method or ("lc" if least_conn else "rr")  # rr, lc or hash
        self.name = f"nginx-{self.method}"
        super().__init__(fleet, workdir, cpus)
        self.proc: Proc | None = None

    def _write_conf(self) -> Path:
        ports = [p for _, p, _ in self.backends.values()]
        conf = self.workdir / "nginx.conf"
        conf.write_text(nginx_conf(self.workdir, self.port, ports, method=self.method))
        return conf

    async def start(self) -> None:
        await self._start_backends(self.fleet)
        self.port = free_port()
        conf = self._write_conf()
        args = ["nginx", "-p", str(self.workdir), "-e", str(self.workdir / "nginx-error.log")]
        args += ["-c", str(conf), "-g", "daemon off;"]
        self.proc = self.group.start("nginx", "nginx", args, cpus=self.cpus)
        await wait_until(
            lambda: http_ok(f"http://127.0.0.1:{self.port}/v1/models"),
            timeout=30,
            what="nginx",
            procs=[self.proc],
        )

    async def attribute(self, results: list[Result]) -> None:
        for r in results:
            if r.backend:  # "127.0.0.1:port" (a list when nginx retried another upstream)
                last = r.backend.split(",")[-1].strip()
                r.backend = self._name_of_port(int(last.rsplit(":", 1)[-1])) or last

    async def _reload(self) -> None:
        assert self.proc is not None
        self._write_conf()
        self.proc.popen.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)  # the master starts new workers; old ones finish their requests

    async def add_backend(self, b: Backend) -> None:
        await self._start_backends([b])
        await self._reload()
        self.actions.append(f"started {b.name}, rewrote nginx.conf, reloaded nginx (SIGHUP)")

    async def remove_backend(self, name: str) -> None:
        _, _, proc = self.backends.pop(name)
        await self._reload()
        took = await terminate(self.group, proc, grace=60)
        self.actions.append(
            f"rewrote nginx.conf without {name}, reloaded nginx (SIGHUP), then SIGTERM {name} "
            f"(exited after {took:.1f} s)"
        )


class HaproxyArm(Arm):
    name = "haproxy"
    component = "haproxy"

    def __init__(
        self,
        fleet: list[Backend],
        workdir: Path,
        cpus: frozenset[int] | None = None,
        *,
        queue_timeout_s: float = 10.0,
    ):
        super().__init__(fleet, workdir, cpus)
        self.queue_timeout_s = queue_timeout_s
        self.proc: Proc | None = None

    def _write_cfg(self) -> Path:
        servers = [(n, p, b.slots) for n, (b, p, _) in self.backends.items()]
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(
            haproxy_cfg(self.workdir, self.port, servers, queue_timeout_s=self.queue_timeout_s)
        )
        return cfg

    async def start(self) -> None:
        await self._start_backends(self.fleet)
        self.port = free_port()
        cfg = self._write_cfg()
        self.proc = self.group.start(
            "haproxy", "haproxy", ["haproxy", "-W", "-db", "-f", str(cfg)], cpus=self.cpus
        )
        await wait_until(
            lambda: http_ok(f"http://127.0.0.1:{self.port}/v1/models"),
            timeout=30,
            what="haproxy",
            procs=[self.proc],
        )

    async def attribute(self, results: list[Result]) -> None:
        return None  # X-Backend already carries the server name

    async def _reload(self) -> None:
        assert self.proc is not None
        self._write_cfg()
        self.proc.popen.send_signal(signal.SIGUSR2)  # master-worker reload; old worker drains
        await asyncio.sleep(1.0)

    async def add_backend(self, b: Backend) -> None:
        await self._start_backends([b])
        await self._reload()
        self.actions.append(f"started {b.name}, rewrote haproxy.cfg, reloaded haproxy (SIGUSR2)")

    async def remove_backend(self, name: str) -> None:
        _, _, proc = self.backends.pop(name)
        await self._reload()
        took = await terminate(self.group, proc, grace=60)
        self.actions.append(
            f"rewrote haproxy.cfg without {name}, reloaded haproxy (SIGUSR2), then SIGTERM "
            f"{name} (exited after {took:.1f} s)"
        )


class SlipstreamArm(Arm):
    name = "slipstream"
    component = "workers"

    def __init__(
        self,
        fleet: list[Backend],
        workdir: Path,
        cpus: frozenset[int] | None = None,
        *,
        gateway_env: dict[str, str] | None = None,
        worker_env: dict[str, str] | None = None,
        gateway_cpus: frozenset[int] | None = None,
    ):
        """``gateway_cpus``: pin the gateway there (``taskset``-like) instead of ``cpus``, so a
        figure about the gateway is not about the processes sharing its core."""
        super().__init__(fleet, workdir, cpus)
        self.gateway_cpus = gateway_cpus or cpus
        self.gateway_env = gateway_env or {}
        self.worker_env = worker_env or {}
        self.redis_port = 0
        # BENCH_ASGI_SERVER=granian|hypercorn: the gateway's app under that server instead of
        # uvicorn (bench/asgi_server.py), to compare them in the same harness
        self.asgi_server = os.environ.get("BENCH_ASGI_SERVER", "uvicorn")
        self.gateway: Proc | None = None
        self.redis: Any = None

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    async def start(self) -> None:
        from redis.asyncio import Redis

        self.redis_port, self.port = free_port(), free_port()
        args = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1"]
        args += [
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--maxclients",
            "30000",
        ]
        redis_proc = self.group.start("redis", "redis", args, cpus=self.cpus)
        self.redis = Redis.from_url(self.redis_url, decode_responses=True)
        await wait_until(self.redis.ping, timeout=20, what="redis", procs=[redis_proc])
        self.group.env["REDIS_URL"] = self.redis_url
        gw = [PYTHON, "-m", "slipstream", "gateway"]
        if self.asgi_server != "uvicorn":  # the same app under another server (measurement)
            gw = [PYTHON, str(Path(__file__).with_name("asgi_server.py")), self.asgi_server]
        gw += ["--host", "127.0.0.1", "--port", str(self.port), "--model", MODEL]
        self.gateway = self.group.start(
            "gateway", "gateway", gw, cpus=self.gateway_cpus, env=self.gateway_env
        )
        await self._start_workers(self.fleet)
        await wait_until(
            lambda: http_ok(f"http://127.0.0.1:{self.port}/readyz"),
            timeout=60,
            what="gateway",
            procs=[self.gateway],
        )

    def _launch_worker(self, b: Backend) -> Proc:
        args = [PYTHON, "-m", "slipstream", "worker", "--model", MODEL, "--engine", "sim"]
        args += ["--max-seqs", str(b.slots), "--capacity-tokens", "10000000"]
        args += [*b.sim_flags(), "--worker-id", b.name]
        proc = self.group.start(b.name, "workers", args, cpus=self.cpus, env=self.worker_env)
        self.backends[b.name] = (b, 0, proc)
        return proc

    async def _registered(self, names: set[str]) -> bool:
        from shared.keys import Keys

        ids = await self.redis.hkeys(Keys().workers)
        return names <= set(ids)

    async def _start_workers(self, fleet: list[Backend]) -> None:
        procs = [self._launch_worker(b) for b in fleet]
        names = {b.name for b in fleet}
        await wait_until(lambda: self._registered(names), timeout=60, what="workers", procs=procs)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self.redis is not None:
                await self.redis.aclose()
        finally:
            self.group.stop_all()

    async def attribute(self, results: list[Result]) -> None:
        """The worker that ran each job: the ``owner`` field of the job's hash in Redis."""
        from shared.keys import Keys

        keys = Keys()
        with_job = [r for r in results if r.job_id]
        for i in range(0, len(with_job), 500):
            part = with_job[i : i + 500]
            async with self.redis.pipeline(transaction=False) as pipe:
                for r in part:
                    pipe.hget(keys.job(MODEL, r.job_id), "owner")
                owners = await pipe.execute()
            for r, owner in zip(part, owners, strict=True):
                r.backend = owner or None

    async def add_backend(self, b: Backend) -> None:
        await self._start_workers([b])
        self.actions.append(f"started worker {b.name} (nothing else)")

    async def remove_backend(self, name: str) -> None:
        _, _, proc = self.backends.pop(name)
        took = await terminate(self.group, proc, grace=60)
        self.actions.append(f"SIGTERM worker {name} (it drained; exited after {took:.1f} s)")


def make_arm(name: str, fleet: list[Backend], workdir: Path, **options: Any) -> Arm:
    cpus = options.pop("cpus", None)
    if name == "direct":
        return Arm(fleet, workdir, cpus)
    if name in ("nginx-rr", "nginx-lc", "nginx-hash"):
        return NginxArm(fleet, workdir, cpus, method=name.removeprefix("nginx-"))
    if name == "haproxy":
        return HaproxyArm(
            fleet, workdir, cpus, queue_timeout_s=options.get("queue_timeout_s", 10.0)
        )
    if name == "slipstream":
        return SlipstreamArm(
            fleet,
            workdir,
            cpus,
            gateway_env=options.get("gateway_env"),
            worker_env=options.get("worker_env"),
            gateway_cpus=options.get("gateway_cpus"),
        )
    raise ValueError(f"unknown arm {name!r}; one of {', '.join(ARMS)}")
