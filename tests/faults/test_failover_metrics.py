"""``slipstream_gateway_redis_master_changes_total`` (the SlipstreamRedisFailover alert) on real
failovers: a Sentinel set whose master is killed, and a 3-master Redis Cluster one of whose
masters is killed. The gateway counts one change each time, whichever shard it was, and only
once."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.cluster import master_run_ids
from shared.redis import connect
from tests.faults.redis_cluster import RedisClusterSet
from tests.faults.sentinel import SentinelSet
from tests.helpers import gateway_settings, running_gateway
from tests.test_metrics import Series, scrape, value

pytestmark = pytest.mark.timeout(120)
MASTERS = "slipstream_gateway_redis_master_changes_total"


async def scrape_until_changed(base: str, timeout: float = 30.0) -> Series:
    """Scrape until the gateway has counted a master change (reads fail during a failover)."""
    end = time.monotonic() + timeout
    series = await scrape(f"{base}/metrics")
    while value(series, MASTERS) == 0 and time.monotonic() < end:
        await asyncio.sleep(0.2)
        series = await scrape(f"{base}/metrics")
    return series


async def test_sentinel_failover_is_one_master_change() -> None:
    group = SentinelSet.start(password="s3cret")
    try:
        group.wait_ready()
        async with running_gateway(gateway_settings(group.url)) as base:
            before = await scrape(f"{base}/metrics")
            old = group.kill_master()
            await asyncio.to_thread(group.wait_failover, old)
            after = await scrape_until_changed(base)
            later = await scrape(f"{base}/metrics")
    finally:
        group.stop()
    assert value(before, MASTERS) == 0
    assert value(after, MASTERS) == 1
    assert value(later, MASTERS) == 1


async def test_cluster_failover_of_one_shard_is_one_master_change() -> None:
    """INFO on a cluster client reaches its default node only; the gateway asks every primary,
    so the killed master is seen whichever shard it served."""
    group = RedisClusterSet.start()
    try:
        client = connect(group.url)
        try:
            assert len(await master_run_ids(client)) == 3  # one per shard
        finally:
            await client.aclose()
        async with running_gateway(gateway_settings(group.url)) as base:
            before = await scrape(f"{base}/metrics")
            victim = group.masters_in_slot_order()[-1]  # not the first slot's owner
            slot = next(s for s, port in group.slot_owners(victim).items() if port == victim)
            group.kill_master(victim)
            await asyncio.to_thread(group.wait_failover, victim, slot)
            after = await scrape_until_changed(base)
            later = await scrape(f"{base}/metrics")
    finally:
        group.stop()
    assert value(before, MASTERS) == 0
    assert value(after, MASTERS) == 1
    assert value(later, MASTERS) == 1
