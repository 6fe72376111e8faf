"""The gateway metrics that the issue-13 alerts read (deploy/prometheus/alerts.yml), scraped
from a real gateway on a real redis-server: dead letters as a counter that trimming does not
lower, pub/sub reconnects, Redis master changes after a restart, the sequence-slot gauges,
and a Redis user without INFO (the rest of /metrics unharmed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis

from shared.keys import Keys
from shared.redis import connect
from tests.helpers import (
    RedisProcess,
    gateway_settings,
    running_gateway,
    running_worker,
    start_redis,
    worker_settings,
)
from tests.test_metrics import scrape, value

pytestmark = pytest.mark.timeout(60)
DEAD = "slipstream_dead_letter_jobs_total"
MASTERS = "slipstream_gateway_redis_master_changes_total"
RECONNECTS = "slipstream_gateway_pubsub_reconnects_total"


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    """A redis-server of this test's own, to restart."""
    server = start_redis()
    yield server
    server.stop(kill=True)


async def test_dead_letters_count_every_job_ever_added_not_the_stream_length(
    redis_url: str, redis: Redis
) -> None:
    dead = Keys().dead_letter("sim-model")
    async with running_gateway(gateway_settings(redis_url)) as base:
        before = await scrape(f"{base}/metrics")
        for i in range(3):
            await redis.xadd(dead, {"job": f"j{i}", "deliveries": "3"})
        await redis.xtrim(dead, maxlen=0)  # the janitor caps the stream: XLEN is 0 now
        after = await scrape(f"{base}/metrics")
    assert (DEAD, frozenset({("model", "sim-model")})) in before  # 0 before the first one
    assert value(before, DEAD, model="sim-model") == 0
    assert value(after, DEAD, model="sim-model") == 3


async def test_master_change_is_counted_once_after_a_redis_restart(
    own_redis: RedisProcess,
) -> None:
    async with running_gateway(gateway_settings(own_redis.url)) as base:
        first = await scrape(f"{base}/metrics")  # the baseline: no change
        again = await scrape(f"{base}/metrics")
        own_redis.stop(kill=True)
        own_redis.restart()  # same port, a new process: a new run_id
        deadline = time.monotonic() + 10
        after = again
        while value(after, MASTERS) == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # the pool reconnects on its own (with retries)
            after = await scrape(f"{base}/metrics")
        later = await scrape(f"{base}/metrics")
    assert value(first, MASTERS) == value(again, MASTERS) == 0
    assert value(after, MASTERS) == 1
    assert value(later, MASTERS) == 1  # counted once, not at every read after


async def test_pubsub_reconnects_are_the_multiplexers(redis_url: str, redis: Redis) -> None:
    """A stream subscribes the gateway's pub/sub link; killing that connection in Redis is a
    reconnect, as the gateway's /metrics says."""
    slow = worker_settings(redis_url, sim_tokens_per_s=20.0)
    body = {"model": "sim-model", "prompt": "hi", "max_tokens": 30, "stream": True}
    async with (
        running_gateway(gateway_settings(redis_url)) as base,
        running_worker(slow),
        httpx.AsyncClient(base_url=base, timeout=20) as client,
    ):
        before = await scrape(f"{base}/metrics")
        async with client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.aiter_lines()
            while "data:" not in await anext(lines):
                pass
            killed = await kill_subscribers(redis)
            text = "".join([line async for line in lines])
        after = await scrape(f"{base}/metrics")
    assert killed >= 1
    assert text.rstrip().endswith("data: [DONE]")  # the stream repaired from its log
    assert value(before, RECONNECTS) == 0
    assert value(after, RECONNECTS) >= 1


async def kill_subscribers(redis: Redis) -> int:
    """CLIENT KILL every connection with a (sharded) subscription; how many."""
    killed = 0
    for client in await redis.client_list():
        if int(client.get("ssub", 0)) + int(client.get("sub", 0)) > 0:
            killed += int(await redis.client_kill_filter(_id=client["id"]))
    return killed


async def test_sequence_slots_come_from_the_workers_heartbeats(redis_url: str) -> None:
    body = {"model": "sim-model", "prompt": "hi", "max_tokens": 40, "stream": True}
    settings = worker_settings(redis_url, max_seqs=3, sim_tokens_per_s=20.0, heartbeat_s=0.05)
    async with (
        running_gateway(gateway_settings(redis_url)) as base,
        running_worker(settings),
        httpx.AsyncClient(base_url=base, timeout=20) as client,
    ):
        idle = await scrape(f"{base}/metrics")
        async with client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.aiter_lines()
            while "data:" not in await anext(lines):
                pass
            busy = idle
            for _ in range(100):  # the next heartbeat carries the running sequence
                busy = await scrape(f"{base}/metrics")
                if value(busy, "slipstream_sequences_in_use") == 1:
                    break
                await asyncio.sleep(0.05)
            _ = [line async for line in lines]
    assert value(idle, "slipstream_capacity_sequences", model="sim-model") == 3
    assert value(idle, "slipstream_sequences_in_use", model="sim-model") == 0
    assert value(busy, "slipstream_sequences_in_use", model="sim-model") == 1


async def test_a_redis_user_without_info_loses_only_the_master_count(redis_url: str) -> None:
    admin = connect(redis_url)
    await admin.execute_command(
        "ACL", "SETUSER", "noinfo", "on", ">pw", "~*", "&*", "+@all", "-info"
    )
    await admin.acl_log_reset()
    url = redis_url.replace("redis://", "redis://noinfo:pw@")
    try:
        async with running_gateway(gateway_settings(url)) as base:
            first = await scrape(f"{base}/metrics")
            second = await scrape(f"{base}/metrics")
        denied = await admin.acl_log()
    finally:
        await admin.execute_command("ACL", "DELUSER", "noinfo")
        await admin.aclose()
    assert value(first, "slipstream_live_workers", model="sim-model") == 0  # gauges were read
    assert value(second, "slipstream_gateway_cluster_read_errors_total") == 0
    assert value(second, MASTERS) == 0
    infos = [entry for entry in denied if entry.get("object") == "info"]
    assert [int(entry["count"]) for entry in infos] == [1], denied  # asked once, not again
