"""Redis Sentinel: every process takes a ``redis+sentinel://`` URL and rides out a failover.

Real processes on loopback: a master, a replica and three ``redis-sentinel`` processes
(``tests/faults/sentinel.py``), gateways and workers started as ``slipstream`` subprocesses,
and the master killed with ``kill -9``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from redis.exceptions import RedisError

from bench.sentinel_failover import MAX_TOKENS, failover
from shared.jobs import Emit, JobStore
from shared.keys import Keys
from shared.models import DoneEvent, EventBatch, JobState, TokenEvent, Usage
from shared.redis import connect
from shared.settings import SENTINEL_PORT, CommonSettings, parse_sentinel_url
from tests.faults.cluster import check_stream, record_result
from tests.faults.sentinel import SentinelSet
from tests.helpers import make_job
from worker.engines.sim import greedy_text

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def sentinels() -> Iterator[SentinelSet]:
    group = SentinelSet.start(password="s3cret")
    try:
        yield group
    finally:
        group.stop()


def test_sentinel_url_parts() -> None:
    url = "rediss+sentinel://app:p%40ss@h1:26380,[::1],h3:1/svc/2?sentinel_password=x"
    parsed = parse_sentinel_url(url)
    assert parsed is not None
    assert parsed.sentinels == (("h1", 26380), ("::1", SENTINEL_PORT), ("h3", 1))
    assert (parsed.service, parsed.db, parsed.tls) == ("svc", 2, True)
    assert (parsed.username, parsed.password, parsed.sentinel_password) == ("app", "p@ss", "x")
    assert parse_sentinel_url("redis://127.0.0.1:6379/0") is None


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://h1:26379/",  # no service
        "redis+sentinel:///mymaster",  # no sentinel
        "redis+sentinel://h1/mymaster/zero",  # db not a number
        "redis+sentinel://h1:x/mymaster",  # port not a number
        "redis+sentinel://h1/mymaster?ssl_ca_cert=/x",  # a typo must not drop verification
    ],
)
def test_malformed_sentinel_urls_fail_at_start(url: str) -> None:
    with pytest.raises(ValueError):
        CommonSettings(REDIS_URL=url)


async def test_streams_survive_a_master_kill() -> None:
    """20 streams through 2 gateways and 2 workers; kill -9 the master mid-stream: every
    stream completes, no token lost or duplicated, text equal to the uninterrupted answer."""
    outcome = await failover(20, min_replicas=0)
    for prompt, record in zip(outcome.prompts, outcome.records, strict=True):
        check_stream(record, greedy_text(prompt, MAX_TOKENS))
    assert outcome.completed == outcome.text_equal == 20
    assert outcome.tokens_lost == outcome.tokens_duplicated == 0
    assert outcome.failover_s < 15
    record_result("sentinel: kill -9 the master under load", **outcome.figures())


async def test_min_replicas_waits_for_a_replica(sentinels: SentinelSet) -> None:
    """With SLIPSTREAM_REDIS_MIN_REPLICAS=1 an enqueue returns once the replica has it; with
    the replica stopped (SIGSTOP) it waits the full timeout and is counted unreplicated."""
    redis = connect(sentinels.url)
    store = JobStore(redis, Keys(), ttl_s=60, min_replicas=1, replica_wait_ms=300)
    replica = sentinels.replicas[0].proc
    try:
        began = time.monotonic()
        await store.enqueue(make_job(prompt="replicated"))
        assert store.unreplicated == 0
        assert time.monotonic() - began < 0.25
        replica.send_signal(signal.SIGSTOP)
        began = time.monotonic()
        await store.enqueue(make_job(prompt="not replicated"))
        assert time.monotonic() - began >= 0.29  # WAIT ran on the connection that wrote
        assert store.unreplicated == 1
    finally:
        replica.send_signal(signal.SIGCONT)
        await redis.aclose()


async def test_enqueue_on_a_master_without_the_scripts(sentinels: SentinelSet) -> None:
    """A promoted replica may not know the scripts: the enqueue loads ENQUEUE and sends its
    pipeline again (WAIT included), and the job is queued once."""
    redis = connect(sentinels.url)
    store = JobStore(redis, Keys(), ttl_s=60, min_replicas=1)
    try:
        await redis.script_flush()
        job = make_job(prompt="no scripts")
        entry = await store.enqueue(job)
        assert entry and await store.job_state(job.model, job.id) == "queued"
        assert await redis.xlen(Keys().queue(job.model, job.priority)) == 1
        assert store.unreplicated == 0
    finally:
        await redis.aclose()


async def test_min_replicas_waits_after_a_jobs_end_only(sentinels: SentinelSet) -> None:
    """The worker's writes wait for the replica only when they end a job: with the replica
    stopped, a token batch returns at once and the final batch waits the timeout."""
    redis = connect(sentinels.url)
    store = JobStore(redis, Keys(), ttl_s=60, min_replicas=1, replica_wait_ms=300)
    replica = sentinels.replicas[0].proc
    try:
        await store.enqueue(make_job(prompt="ends"))
        pull = {"free_tokens": 10**6, "idle": True, "lease_ms": 60_000, "aging_ms": {}}
        taken = await store.pull("sim-model", "w", max_deliveries=3, **pull)  # type: ignore[arg-type]
        assert taken.claimed is not None
        replica.send_signal(signal.SIGSTOP)
        began = time.monotonic()
        token = EventBatch(events=[TokenEvent(s=1, x=" a")])
        assert await store.emit_many([Emit(taken.claimed, token, 1)]) == [True]
        assert time.monotonic() - began < 0.25 and store.unreplicated == 0
        end = EventBatch(
            events=[
                DoneEvent(
                    s=2, finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=1)
                )
            ]
        )
        began = time.monotonic()
        assert await store.emit_many([Emit(taken.claimed, end, 0, JobState.COMPLETED)]) == [True]
        assert time.monotonic() - began >= 0.29 and store.unreplicated == 1
    finally:
        replica.send_signal(signal.SIGCONT)
        await redis.aclose()


def cli(url: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": url, "SLIPSTREAM_LOG_LEVEL": "warning"}
    return subprocess.run(
        [sys.executable, "-m", "slipstream", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def test_status_keys_and_janitor_on_sentinel(sentinels: SentinelSet) -> None:
    """``slipstream status``/``keys`` answer through the sentinels; the janitor (arq) keeps
    firing its chores on the new master after a failover."""
    status = cli(sentinels.url, "status")
    assert status.returncode == 0, status.stderr
    keys = cli(sentinels.url, "keys", "list")
    assert keys.returncode == 0, keys.stderr
    env = {
        **os.environ,
        "REDIS_URL": sentinels.url,
        "SLIPSTREAM_JANITOR_INTERVAL_S": "1",
        "SLIPSTREAM_LOG_LEVEL": "warning",
    }
    janitor = subprocess.Popen([sys.executable, "-m", "slipstream", "janitor"], env=env)
    redis = connect(sentinels.url)
    try:
        await wait_janitor_log(redis, 1)
        old = sentinels.kill_master()
        await asyncio.to_thread(sentinels.wait_failover, old)
        before = await redis.xlen(Keys().janitor_log)  # on the new master
        await wait_janitor_log(redis, before + 2)
        assert janitor.poll() is None, "the janitor died in the failover"
        assert sentinels.master_port() != old
    finally:
        janitor.kill()
        janitor.wait(10)
        await redis.aclose()


async def wait_janitor_log(redis: object, n: int, timeout: float = 20.0) -> None:
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    assert isinstance(redis, Redis)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if await redis.xlen(Keys().janitor_log) >= n:
                return
        except RedisError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the janitor did not log {n} firings")


async def test_tls_sentinel_url_verifies_and_fails_over() -> None:
    """``rediss+sentinel://``: TLS to the sentinels and the master, verified against the CA
    named in the URL (and refused without it), carried across a failover."""
    group = SentinelSet.start(password="s3cret", tls=True)
    redis = connect(group.url)
    unverified = connect(group.url.partition("?")[0], socket_timeout=2.0)
    try:
        await redis.set("before", "1")
        with pytest.raises(RedisError, match="CERTIFICATE_VERIFY_FAILED"):
            await unverified.ping()  # a self-signed CA the system does not trust
        old = group.kill_master()
        await redis.set("after", "2")  # retried until the sentinels name the new master
        assert await redis.mget("before", "after") == ["1", "2"]
        assert group.master_port() != old
    finally:
        await unverified.aclose()
        await redis.aclose()
        group.stop()
