"""Redis for workers on other hosts: the shipped ACL file (gateway and worker users that can do
only their own work) and TLS (``rediss://``) through the one connection factory."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoPermissionError

from gateway.apikeys import Scope, create_key
from shared.keys import Keys
from shared.redis import connect
from shared.redis_connection import WriteNowSSLConnection
from tests.helpers import (
    RedisProcess,
    free_port,
    gateway_settings,
    running_gateway,
    running_worker,
    start_redis,
    wait_for_port,
    worker_settings,
)
from worker.engines.sim import SimEngine, SimProfile
from worker.service import Worker

ACL = Path(__file__).resolve().parent.parent / "deploy" / "redis" / "users.acl"
PASSWORDS = {
    "admin": "change-me-admin",
    "gateway": "change-me-gateway",
    "worker": "change-me-worker",
}
READS = ["/v1/models", "/readyz", "/metrics", "/dashboard/data"]
CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}


@pytest.fixture(scope="module")
def acl_redis() -> Iterator[RedisProcess]:
    server = start_redis("--aclfile", str(ACL))
    yield server
    server.stop()


def url_for(server: RedisProcess, user: str) -> str:
    return f"redis://{user}:{PASSWORDS[user]}@127.0.0.1:{server.port}/0"


@contextlib.asynccontextmanager
async def worker_as(url: str, watcher: Redis) -> AsyncIterator[Worker]:
    """A sim worker whose every command runs as ``url``'s user (``watcher`` sees it join)."""
    redis = connect(url)
    worker = Worker(worker_settings(url), redis, SimEngine(SimProfile()))
    task = asyncio.create_task(worker.run())
    try:
        while not await watcher.hexists(Keys().workers, worker.id):
            assert not task.done(), task.exception()
            await asyncio.sleep(0.01)
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
        await redis.aclose()


async def test_gateway_and_worker_users_serve_a_request(acl_redis: RedisProcess) -> None:
    admin = connect(url_for(acl_redis, "admin"))
    await admin.flushall()
    gateway_url, worker_url = url_for(acl_redis, "gateway"), url_for(acl_redis, "worker")
    as_gateway = connect(gateway_url)
    gw = gateway_settings(gateway_url, auth_required=True)
    try:
        secret, _ = await create_key(  # as the keys CLI does; /metrics needs the metrics scope
            as_gateway, Keys(), "acme", rpm=10, tpm=10_000, scopes=[Scope.INFERENCE, Scope.METRICS]
        )
        async with (
            running_gateway(gw) as base,
            worker_as(worker_url, admin),
            httpx.AsyncClient(base_url=base, timeout=10) as c,
        ):
            headers = {"Authorization": f"Bearer {secret}"}
            plain = await c.post("/v1/chat/completions", json=CHAT, headers=headers)
            stream = await c.post(
                "/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers
            )
            job = await c.post("/v1/jobs", json=CHAT, headers=headers)
            looked = await c.get(f"/v1/jobs/{job.json()['id']}", headers=headers)
            cancelled = await c.delete(f"/v1/jobs/{job.json()['id']}", headers=headers)
            reads = [(await c.get(p, headers=headers)).status_code for p in READS]
        assert plain.status_code == 200, plain.text
        assert len(plain.json()["choices"][0]["message"]["content"].split()) == 6
        assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")
        assert looked.status_code == 200 and cancelled.status_code == 200
        assert reads == [200] * len(READS)
        denied = await admin.execute_command("ACL", "LOG")
        assert denied == [], denied  # nothing the services did was refused
    finally:
        await as_gateway.aclose()
        await admin.aclose()


@pytest.mark.parametrize(
    "command",
    [("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("ACL", "LIST"), ("SHUTDOWN",)],
    ids=lambda c: c[0],
)
async def test_worker_user_is_refused_admin_commands(
    acl_redis: RedisProcess, command: tuple[str, ...]
) -> None:
    worker = connect(url_for(acl_redis, "worker"))
    try:
        with pytest.raises(NoPermissionError):
            await worker.execute_command(*command)
        assert await worker.ping()
    finally:
        await worker.aclose()


async def test_users_touch_only_their_keys(acl_redis: RedisProcess) -> None:
    worker = connect(url_for(acl_redis, "worker"))
    gateway = connect(url_for(acl_redis, "gateway"))
    try:
        with pytest.raises(NoPermissionError):
            await worker.hget(Keys().api_key("0" * 64), "tenant")  # type: ignore[misc]
        with pytest.raises(NoPermissionError):
            await worker.set(Keys().job_index("x"), "m")
        with pytest.raises(NoPermissionError):
            await gateway.set("other-app:key", "1")
        with pytest.raises(NoPermissionError):
            await gateway.execute_command("FLUSHDB")
    finally:
        await worker.aclose()
        await gateway.aclose()


async def test_default_user_and_wrong_password_are_refused(acl_redis: RedisProcess) -> None:
    anonymous = connect(acl_redis.url)
    wrong = connect(f"redis://worker:guess@127.0.0.1:{acl_redis.port}/0")
    try:
        with pytest.raises(AuthenticationError):  # NOAUTH: the default user is off
            await anonymous.get("slip:models")
        with pytest.raises(AuthenticationError):
            await wrong.ping()
    finally:
        await anonymous.aclose()
        await wrong.aclose()


# --- TLS --------------------------------------------------------------------------------------


OPENSSL = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
SAN = ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[tuple[int, str]]:
    """A redis-server that speaks only TLS, with a self-signed certificate for 127.0.0.1."""
    workdir = Path(tempfile.mkdtemp(prefix="slip-tls-"))
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [*OPENSSL, "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost", *SAN],
        check=True,
        capture_output=True,
    )
    port = free_port()
    server = shutil.which("redis-server")
    assert server
    args = [server, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"]
    args += ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    args += ["--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--save", ""]
    proc = subprocess.Popen([*args, "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield port, str(cert)
    finally:
        proc.terminate()
        proc.wait(10)


async def test_rediss_url_round_trip(tls_redis: tuple[int, str]) -> None:
    port, ca = tls_redis
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required"
    client: Redis = connect(url)
    try:
        await client.flushall()
        async with (
            running_gateway(gateway_settings(url)) as base,
            running_worker(worker_settings(url)),
            httpx.AsyncClient(base_url=base, timeout=10) as c,
        ):
            response = await c.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200
        assert client.connection_pool.connection_class is WriteNowSSLConnection
    finally:
        await client.aclose()


async def test_rediss_without_the_ca_is_refused(tls_redis: tuple[int, str]) -> None:
    port, _ = tls_redis
    client = connect(f"rediss://127.0.0.1:{port}/0", socket_timeout=2.0)
    try:
        with pytest.raises(Exception, match=r"(?i)certificate"):
            await client.ping()
    finally:
        await client.aclose()
