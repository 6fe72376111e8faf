"""A real Redis Cluster on loopback: three masters and three replicas (``redis-server
--cluster-enabled yes`` joined by ``redis-cli --cluster create … --cluster-replicas 1``), for
the Cluster fault test and benchmark.

Nodes use a short ``cluster-node-timeout`` (1 s) so that a failover takes about two seconds
instead of the default fifteen, and ``cluster-require-full-coverage no``: with Redis's default
(``yes``) every node refuses every command (``CLUSTERDOWN``) from the moment one master is
marked failed until its replica is promoted, so one shard's failure would stall all of them.
That setting is what makes "the other shards are undisturbed" possible, and docs should tell
operators to set it. ``cluster-replica-validity-factor 0`` lets a replica take over however
long it was cut off (the test kills a master whose replica was in sync moments before).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import redis
from redis.crc import key_slot

from tests.helpers import RedisProcess, free_port, wait_for_port

SLOTS = 16384


@dataclass
class RedisClusterSet:
    """The six nodes of a 3-master, 3-replica cluster, and what the test asks of them."""

    nodes: list[RedisProcess] = field(default_factory=list)
    password: str | None = None
    node_timeout_ms: int = 1000
    full_coverage: bool = False

    @classmethod
    def start(
        cls,
        *,
        masters: int = 3,
        password: str | None = None,
        node_timeout_ms: int = 1000,
        full_coverage: bool = False,
    ) -> RedisClusterSet:
        """Start ``2 * masters`` nodes, join them and wait until the cluster serves."""
        group = cls([], password, node_timeout_ms, full_coverage)
        try:
            for _ in range(2 * masters):
                group.nodes.append(group._start_node())
            group._create()
            group.wait_ready()
        except BaseException:
            group.stop()
            raise
        return group

    def _start_node(self) -> RedisProcess:
        server = shutil.which("redis-server")
        assert server, "redis-server must be installed (scripts/install-system-deps.sh)"
        port, bus = free_port(), free_port()  # the default bus port, port + 10000, may be taken
        workdir = tempfile.mkdtemp(prefix="slip-rcluster-")
        args = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir]
        args += ["--cluster-port", str(bus)]
        args += ["--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]
        args += ["--cluster-enabled", "yes", "--cluster-config-file", f"{workdir}/nodes.conf"]
        args += ["--cluster-node-timeout", str(self.node_timeout_ms)]
        args += ["--cluster-require-full-coverage", "yes" if self.full_coverage else "no"]
        args += ["--cluster-replica-validity-factor", "0"]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        node = RedisProcess(port, subprocess.Popen(args, stdout=subprocess.DEVNULL), workdir, args)
        try:
            wait_for_port(port)
        except BaseException:
            node.stop(kill=True)
            raise
        return node

    def _create(self) -> None:
        cli = shutil.which("redis-cli")
        assert cli, "redis-cli must be installed (Debian's redis-tools, with redis-server)"
        auth = ["--no-auth-warning", "-a", self.password] if self.password else []
        hosts = [f"127.0.0.1:{node.port}" for node in self.nodes]
        args = [cli, *auth, "--cluster", "create", *hosts, "--cluster-replicas", "1"]
        done = subprocess.run([*args, "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")

    # --- addresses ---------------------------------------------------------------------------
    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def live_ports(self) -> list[int]:
        return [node.port for node in self.nodes if node.proc.poll() is None]

    @property
    def url(self) -> str:
        """``redis+cluster://[:password@]127.0.0.1:p1,…``: every node as a startup node."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        auth = f":{self.password}@" if self.password else ""
        return f"redis+cluster://{auth}{hosts}"

    def client(self, port: int) -> redis.Redis:
        """A plain (non-cluster) client of one node."""
        return redis.Redis(
            port=port,
            password=self.password,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            decode_responses=True,
        )

    def _ask(self, port: int, *command: str) -> str:
        with self.client(port) as node:
            reply = node.execute_command(*command)
        return reply if isinstance(reply, str) else reply.decode()

    def role(self, port: int) -> dict[str, str]:
        """``INFO replication`` of the node on ``port``."""
        with self.client(port) as node:
            return {k: str(v) for k, v in node.info("replication").items()}

    # --- who serves what -----------------------------------------------------------------------
    def slot_owners(self, port: int) -> dict[int, int]:
        """Each slot's master port as the node on ``port`` sees it (failed masters left out)."""
        owners: dict[int, int] = {}
        for line in self._ask(port, "CLUSTER", "NODES").splitlines():
            parts = line.split()
            flags = parts[2].split(",")
            if "master" not in flags or "fail" in flags or "fail?" in flags:
                continue
            owner = int(parts[1].split("@")[0].rsplit(":", 1)[1])
            for spec in parts[8:]:
                if spec.startswith("["):
                    continue  # a slot being migrated or imported
                first, _, last = spec.partition("-")
                for slot in range(int(first), int(last or first) + 1):
                    owners[slot] = owner
        return owners

    def masters_in_slot_order(self) -> list[int]:
        """The masters' ports, the one serving the lowest slots first."""
        owners = self.slot_owners(self.live_ports()[0])
        return list(dict.fromkeys(owners[slot] for slot in sorted(owners)))

    def master_of_slot(self, slot: int) -> int:
        """The port of the master serving ``slot``, as the first live node sees it."""
        for port in self.live_ports():
            try:
                owner = self.slot_owners(port).get(slot)
            except redis.RedisError:
                continue
            if owner is not None:
                return owner
        raise RuntimeError(f"no live node names a master for slot {slot}")

    def master_for_key(self, key: str) -> int:
        """The master port serving ``key`` (a ``{tag}`` in it decides, as in shared/keys.py)."""
        return self.master_of_slot(key_slot(key.encode()))

    @staticmethod
    def slot_of_model(model: str) -> int:
        """Every per-model key is tagged ``{model}``: the model's slot is ``key_slot(model)``."""
        return key_slot(model.encode())

    def master_for_model(self, model: str) -> int:
        """The master port serving every per-model key of ``model``."""
        return self.master_of_slot(self.slot_of_model(model))

    def models_on_distinct_masters(self, n: int, prefix: str = "shard-model") -> list[str]:
        """``n`` model names (``prefix-i``) whose keys land on ``n`` different masters."""
        owners = self.slot_owners(self.live_ports()[0])
        chosen: dict[int, str] = {}
        for i in range(10_000):
            name = f"{prefix}-{i}"
            chosen.setdefault(owners[self.slot_of_model(name)], name)
            if len(chosen) == n:
                return list(chosen.values())
        raise RuntimeError(f"fewer than {n} masters serve slots")

    def replica_of(self, master_port: int) -> int:
        """The port of a replica following the master on ``master_port``."""
        for port in self.live_ports():
            info = self.role(port)
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == master_port:
                return port
        raise RuntimeError(f"no live replica follows {master_port}")

    # --- readiness and failover ----------------------------------------------------------------
    def wait_ready(self, timeout: float = 30.0) -> None:
        """Every node says ``cluster_state:ok`` with every slot served and knows all the others,
        and every replica finished its first sync (a failover before it would lose all)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all(self._node_ready(port) for port in self.live_ports()):
                return
            time.sleep(0.1)
        raise TimeoutError("the cluster did not come up (state, slots, nodes or replicas)")

    def _node_ready(self, port: int) -> bool:
        try:
            info = self._cluster_info(port)
            replication = self.role(port)
        except redis.RedisError:
            return False
        ok = (
            info.get("cluster_state") == "ok"
            and int(info.get("cluster_slots_ok", 0)) == SLOTS
            and int(info.get("cluster_known_nodes", 0)) == len(self.live_ports())
        )
        if replication.get("role") == "slave":
            in_sync = replication.get("master_link_status") == "up"
            return ok and in_sync and replication.get("master_sync_in_progress") == "0"
        return ok

    def _cluster_info(self, port: int) -> dict[str, str]:
        lines = self._ask(port, "CLUSTER", "INFO").splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line)

    def kill_master(self, port: int) -> None:
        """``kill -9`` the master on ``port`` (it must be a master now)."""
        assert self.role(port).get("role") == "master", port
        for node in self.nodes:
            if node.port == port:
                node.stop(kill=True)
                return
        raise RuntimeError(f"no node of ours listens on {port}")

    def wait_failover(self, old_port: int, slot: int, timeout: float = 20.0) -> int:
        """Until every surviving node names the same new master for ``slot`` (once the old
        master's) and says ``cluster_state:ok``; returns the new master's port."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            owners = set()
            for port in self.live_ports():
                try:
                    owners.add(self.slot_owners(port).get(slot))
                    if self._cluster_info(port).get("cluster_state") != "ok":
                        owners.add(None)
                except redis.RedisError:
                    owners.add(None)
            if len(owners) == 1 and (new := owners.pop()) not in (None, old_port):
                assert new is not None
                return new
            time.sleep(0.05)
        raise TimeoutError(f"no replica took over slot {slot} from {old_port}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(kill=True)
