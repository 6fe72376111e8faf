"""Containers, really run: the image builds, ``docker compose`` runs it, workers scale by count.

What a user does, on a real Docker engine: build deploy/Dockerfile (on a Debian base made
offline by scripts/docker-host.sh, sim engine only so it takes a minute, not the llama
compile), ``docker compose up --scale worker=3`` with Redis and a gateway (docker-compose.yml
plus the overlay deploy/docker/compose.ci.yml), then the ``openai`` SDK on the host streams
through the published port. Three concurrent streams land on three worker containers (one
sequence each, seen by ``slipstream status`` inside the network and by each job's owner in
Redis); ``docker kill`` of the container running one of them mid-stream, and that stream still
completes, token for token the simulator's answer, on another container. Everything is torn
down in a ``finally``.

Marked ``docker``: ``make test`` and ``.ci/run`` run it; deselect it with ``-m "not docker"``
on a machine without root or Docker. It is never skipped on its own: a host where Docker
cannot be brought up fails here, loudly (scripts/docker-host.sh installs and starts it).
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import pathlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import openai
import pytest

from shared.keys import Keys
from tests.helpers import free_port
from worker.engines.sim import greedy_text

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASE_IMAGE = "local/debian:bookworm"
IMAGE = "slipstream:ci-sim"
MODEL = "gemma-3-270m"  # the compose file's model name; served here by the sim engine
MAX_TOKENS = 200
TOKENS_PER_S = 20  # 10 s a stream: time to look at every worker and kill one mid-stream
FIGURES = ROOT / "artifacts" / "docker_compose.json"


def sh(*args: str, timeout: float, env: dict[str, str] | None = None) -> str:
    """Run a command; its output, or a failure that shows what it printed."""
    done = subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(args[:4])}... exited {done.returncode}:\n{done.stdout[-3000:]}"
            f"\n{done.stderr[-3000:]}"
        )
    return done.stdout


def build_args() -> list[str]:
    """How pip inside the build reaches PyPI from this host: the CAs this host added to its
    trust store (a TLS-inspecting proxy) and, when set, an http(s) index of PyPI's."""
    args = ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", "EXTRAS="]
    pems = [
        pathlib.Path(p).read_text()
        for p in sorted(glob.glob("/usr/local/share/ca-certificates/**/*.crt", recursive=True))
    ]
    if pems:
        args += ["--build-arg", "EXTRA_CA_CERTS=" + "\n".join(pems)]
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        urls = [u for u in os.environ.get(name, "").split() if u.startswith(("http:", "https:"))]
        if urls:
            args += ["--build-arg", f"{name}={' '.join(urls)}"]
    return args


def record(**figures: float) -> None:
    """Keep this run's timings in artifacts/docker_compose.json (docs/operations.md)."""
    FIGURES.parent.mkdir(exist_ok=True)
    old = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    FIGURES.write_text(json.dumps(old | figures, indent=2) + "\n")
    print(figures)


@pytest.fixture(scope="module")
def image() -> str:
    sh("bash", "scripts/docker-host.sh", timeout=600)
    began = time.monotonic()
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}  # no buildx here: the legacy builder
    sh(
        "docker",
        "build",
        "-f",
        "deploy/Dockerfile",
        *build_args(),
        "-t",
        IMAGE,
        ".",
        timeout=900,
        env=env,
    )
    size = int(sh("docker", "image", "inspect", "-f", "{{.Size}}", IMAGE, timeout=30))
    record(sim_image_build_s=round(time.monotonic() - began, 1), sim_image_mb=size // 2**20)
    return IMAGE


@dataclass
class Stack:
    """One compose project: its own name, network, volume and gateway port."""

    project: str
    port: int
    env: dict[str, str]
    files: tuple[str, ...] = ("-f", "docker-compose.yml", "-f", "deploy/docker/compose.ci.yml")
    started: float = field(default_factory=time.monotonic)

    def argv(self, *args: str) -> list[str]:
        return ["docker", "compose", "-p", self.project, *self.files, *args]

    def compose(self, *args: str, timeout: float = 120) -> str:
        return sh(*self.argv(*args), timeout=timeout, env=self.env)

    def exec(self, service: str, *cmd: str) -> str:
        return self.compose("exec", "-T", service, *cmd, timeout=60)

    def workers(self) -> dict[str, str]:
        """Running worker containers: hostname (the worker id's first part) -> container id."""
        ids = self.compose("ps", "-q", "worker").split()
        names = sh("docker", "inspect", "-f", "{{.Config.Hostname}}", *ids, timeout=30).split()
        return dict(zip(names, ids, strict=True))

    def owner(self, job_id: str) -> tuple[str, int]:
        """The worker holding ``job_id`` now, and how many times it was delivered."""
        key = Keys().job(MODEL, job_id)
        out = self.exec("redis", "redis-cli", "HMGET", key, "owner", "deliveries")
        owner, deliveries = [*out.splitlines(), "", ""][:2]  # raw: one value a line
        assert owner and deliveries.isdigit(), f"job {job_id} has no owner: {out!r}"
        return owner, int(deliveries)


@pytest.fixture
def stack(image: str) -> Iterator[Stack]:
    port = free_port()
    env = {
        **os.environ,
        "SLIPSTREAM_IMAGE": image,
        "SLIPSTREAM_GATEWAY_PORT": str(port),
        "SLIPSTREAM_SIM_TOKENS_PER_S": str(TOKENS_PER_S),
    }
    stack = Stack(f"slipci{os.getpid()}", port, env)
    try:
        up = "up -d --no-build --scale worker=3 redis gateway worker"
        stack.compose(*up.split(), timeout=300)
        yield stack
    finally:
        logs = subprocess.run(
            stack.argv("logs", "--no-color", "--tail", "30"),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        print(logs.stdout[-8000:])  # shown when the test fails
        down = stack.argv("down", "-v", "--remove-orphans", "--timeout", "5")
        subprocess.run(down, cwd=ROOT, env=env, timeout=180, check=False)


def worker_rows(status: str) -> list[str]:
    return [ln for ln in status.splitlines() if f" {MODEL} " in ln and " sim " in ln]


async def wait_ready(stack: Stack, timeout: float = 120.0) -> openai.AsyncOpenAI:
    """An API key (auth is on in docker-compose.yml), the gateway answering a completion and
    three healthy workers in the registry; compose up -> first token is recorded."""
    key = (
        await asyncio.to_thread(
            stack.exec, "gateway", "slipstream", "keys", "create", "--tenant", "ci"
        )
    ).strip()
    client = openai.AsyncOpenAI(
        api_key=key, base_url=f"http://127.0.0.1:{stack.port}/v1", max_retries=0, timeout=30
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            stream = await client.completions.create(
                model=MODEL, prompt="warm up", max_tokens=1, temperature=0, stream=True
            )
            async for _ in stream:
                break
            await stream.close()
            break
        except (openai.APIConnectionError, openai.APIStatusError):
            assert time.monotonic() < deadline, "the gateway never answered a completion"
            await asyncio.sleep(0.5)
    record(compose_up_to_first_token_s=round(time.monotonic() - stack.started, 2))
    while (
        len(worker_rows(await asyncio.to_thread(stack.exec, "gateway", "slipstream", "status"))) < 3
    ):
        assert time.monotonic() < deadline, "three workers never registered"
        await asyncio.sleep(0.5)
    return client


async def all_busy_in_status(stack: Stack, timeout: float = 3.0) -> None:
    """``slipstream status`` in the network shows every worker at 1/1 sequences (a worker's
    registry entry is refreshed at its heartbeat, 1 s, so the first look may be stale)."""
    deadline = time.monotonic() + timeout
    while True:
        status = await asyncio.to_thread(stack.exec, "gateway", "slipstream", "status")
        if len([row for row in worker_rows(status) if " 1/1 " in row]) == 3:
            return
        assert time.monotonic() < deadline, f"not every worker took a job:\n{status}"
        await asyncio.sleep(0.3)


@dataclass
class Stream:
    prompt: str
    job_id: str = ""
    text: list[str] = field(default_factory=list)
    finish: str | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)


async def consume(client: openai.AsyncOpenAI, s: Stream) -> None:
    async with client.completions.with_streaming_response.create(
        model=MODEL, prompt=s.prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
    ) as response:
        s.job_id = response.headers["x-slipstream-job-id"]
        async for chunk in await response.parse():
            if chunk.choices:
                s.text.append(chunk.choices[0].text)
                s.finish = chunk.choices[0].finish_reason or s.finish
                s.started.set()


async def test_three_worker_containers_share_jobs_and_survive_a_killed_one(
    stack: Stack,
) -> None:
    async with await wait_ready(stack) as client:
        await share_and_kill(stack, client)


async def share_and_kill(stack: Stack, client: openai.AsyncOpenAI) -> None:
    streams = [Stream(f"container stream {i}: tell me about queues") for i in range(3)]
    tasks = [asyncio.create_task(consume(client, s)) for s in streams]
    try:
        await asyncio.wait_for(asyncio.gather(*(s.started.wait() for s in streams)), 60)
        # All three at once, one sequence per worker: each container runs one of them.
        await all_busy_in_status(stack)
        workers = await asyncio.to_thread(stack.workers)
        owners = [(await asyncio.to_thread(stack.owner, s.job_id))[0] for s in streams]
        hosts = [owner.split("-")[0] for owner in owners]
        assert sorted(hosts) == sorted(workers), f"owners {owners}, containers {workers}"

        victim = workers[hosts[0]]
        ended_before_kill = streams[0].finish is not None
        await asyncio.to_thread(sh, "docker", "kill", victim, timeout=60)
        killed_at = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        kill_to_end = time.monotonic() - killed_at
    finally:
        for task in tasks:
            task.cancel()
    assert not ended_before_kill, "the worker was killed after its stream had ended"
    for s in streams:
        assert s.finish == "length", s.prompt
        assert "".join(s.text) == greedy_text(s.prompt, MAX_TOKENS), "a token lost or repeated"
    owner, deliveries = await asyncio.to_thread(stack.owner, streams[0].job_id)
    assert owner.split("-")[0] in set(workers) - {hosts[0]} and deliveries >= 2
    state = sh("docker", "inspect", "-f", "{{.State.Status}}", victim, timeout=30).strip()
    assert state == "exited"
    record(kill_to_stream_end_s=round(kill_to_end, 2))
