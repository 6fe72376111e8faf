"""A real Sentinel deployment on loopback: a master, replicas and three ``redis-sentinel``
processes (Debian's ``redis-sentinel`` package), for the failover test and benchmark.

Sentinels watch with a short ``down-after-milliseconds`` so that a failover takes about two
seconds instead of the default thirty; everything else is Redis's defaults. With ``tls`` every
server and sentinel listens only on TLS (a throwaway CA made with the ``openssl`` CLI) and
replicates and monitors over TLS.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.helpers import RedisProcess, free_port, wait_for_port

SERVICE = "mymaster"


def make_certs(workdir: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1 in ``workdir``; returns it."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl must be installed for the TLS test"

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=workdir, check=True, capture_output=True)

    key = ["-newkey", "rsa:2048", "-nodes"]
    run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=test-ca")
    run("req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (workdir / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "ext.cnf")  # fmt: skip
    return workdir


@dataclass
class SentinelSet:
    """The master, its replicas and the sentinels watching them."""

    master: RedisProcess
    replicas: list[RedisProcess]
    sentinels: list[tuple[int, subprocess.Popen[bytes]]] = field(default_factory=list)
    password: str | None = None
    down_after_ms: int = 500
    certs: Path | None = None  # TLS everywhere when set

    @classmethod
    def start(
        cls,
        *,
        replicas: int = 1,
        password: str | None = None,
        down_after_ms: int = 500,
        tls: bool = False,
    ) -> SentinelSet:
        certs = make_certs(Path(tempfile.mkdtemp(prefix="slip-tls-"))) if tls else None
        group = cls(start_server([], password, certs), [], [], password, down_after_ms, certs)
        try:
            for _ in range(replicas):
                follow = ["--replicaof", "127.0.0.1", str(group.master.port)]
                group.replicas.append(start_server(follow, password, certs))
            for _ in range(3):
                group.sentinels.append(group._start_sentinel())
            group.wait_ready()
        except BaseException:
            group.stop()
            raise
        return group

    def _start_sentinel(self) -> tuple[int, subprocess.Popen[bytes]]:
        binary = shutil.which("redis-sentinel")
        assert binary, "redis-sentinel must be installed (scripts/install-system-deps.sh)"
        port = free_port()
        workdir = Path(tempfile.mkdtemp(prefix="slip-sentinel-"))
        lines = [
            *(tls_lines(port, self.certs) if self.certs else [f"port {port}"]),
            "bind 127.0.0.1",
            f"dir {workdir}",
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2",
            f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}",
            f"sentinel failover-timeout {SERVICE} 5000",
            f"sentinel parallel-syncs {SERVICE} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {SERVICE} {self.password}")
        conf = workdir / "sentinel.conf"
        conf.write_text("\n".join(lines) + "\n")  # sentinel rewrites it: a file of its own
        proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL)
        wait_for_port(port)
        return port, proc

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port, _ in self.sentinels)
        auth = f":{self.password}@" if self.password else ""
        if self.certs is None:
            return f"redis+sentinel://{auth}{hosts}/{SERVICE}/0"
        return f"rediss+sentinel://{auth}{hosts}/{SERVICE}/0?ssl_ca_certs={self.certs}/ca.crt"

    def _client(self, port: int, password: str | None = None) -> redis.Redis:
        return redis.Redis(
            port=port,
            password=password,
            socket_timeout=1.0,
            decode_responses=True,
            ssl=self.certs is not None,
            ssl_ca_certs=f"{self.certs}/ca.crt" if self.certs else None,
        )

    def _ask(self, port: int, *command: str) -> object:
        with self._client(port) as client:
            return client.execute_command(*command)

    def master_port(self) -> int:
        """The master as the first answering sentinel sees it."""
        for port, _ in self.sentinels:
            if (master := self._master_seen_by(port)) is not None:
                return master
        raise RuntimeError("no sentinel answers")

    def _master_seen_by(self, port: int) -> int | None:
        """The master's port as the sentinel on ``port`` names it (None: no answer)."""
        try:
            reply = self._ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        except redis.RedisError:
            return None
        assert isinstance(reply, list)
        return int(reply[1])

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Every sentinel knows the others and the replicas, and the replicas are in sync."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._in_sync() and all(self._ready(port) for port, _ in self.sentinels):
                return
            time.sleep(0.1)
        raise TimeoutError("the sentinels did not discover each other and the replicas")

    def _in_sync(self) -> bool:
        """Every replica finished its first sync (a failover before it would lose all)."""
        with self._client(self.master.port, self.password) as client:
            info = client.info("replication")
        online = [k for k, v in info.items() if k.startswith("slave") and "online" in str(v)]
        return len(online) >= len(self.replicas)

    def _ready(self, port: int) -> bool:
        try:
            reply = self._ask(port, "SENTINEL", "MASTER", SERVICE)
        except redis.RedisError:
            return False
        assert isinstance(reply, dict | list)
        info = reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))
        return (
            int(info.get("num-other-sentinels", 0)) >= len(self.sentinels) - 1
            and int(info.get("num-slaves", 0)) >= len(self.replicas)
            and "s_down" not in str(info.get("flags", ""))
        )

    def kill_master(self) -> int:
        """``kill -9`` the current master; returns its port."""
        port = self.master_port()
        for server in [self.master, *self.replicas]:
            if server.port == port:
                server.stop(kill=True)
                return port
        raise RuntimeError(f"no process of ours listens on the master's port {port}")

    def wait_failover(self, old_port: int, timeout: float = 30.0) -> int:
        """Wait until every sentinel names a new master; returns its port."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            seen = (self._master_seen_by(port) for port, _ in self.sentinels)
            ports = {master for master in seen if master is not None}
            if len(ports) == 1 and old_port not in ports:
                return ports.pop()
            time.sleep(0.05)
        raise TimeoutError("no failover")

    def stop(self) -> None:
        for _, proc in self.sentinels:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for server in [self.master, *self.replicas]:
            server.stop(kill=True)


def tls_lines(port: int, certs: Path) -> list[str]:
    """Config lines: listen on ``port`` with TLS only, and speak TLS to other servers."""
    return [
        "port 0",
        f"tls-port {port}",
        f"tls-cert-file {certs}/server.crt",
        f"tls-key-file {certs}/server.key",
        f"tls-ca-cert-file {certs}/ca.crt",
        "tls-auth-clients no",
        "tls-replication yes",
    ]


def start_server(extra: list[str], password: str | None, certs: Path | None) -> RedisProcess:
    """A redis-server on a free port (TLS only when ``certs``), quick to start a replica."""
    server = shutil.which("redis-server")
    assert server, "redis-server must be installed (apt-get install redis-server)"
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="slip-redis-")
    args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir]
    args += ["--appendonly", "no", "--repl-diskless-sync-delay", "0"]
    for line in tls_lines(port, certs) if certs else []:
        name, value = line.split(" ", 1)
        args += [f"--{name}", value]
    if password:
        args += ["--requirepass", password, "--masterauth", password]
    proc = subprocess.Popen([*args, *extra], stdout=subprocess.DEVNULL)
    wait_for_port(port)
    return RedisProcess(port, proc, workdir, [*args, *extra])
