"""Queue positions from one shared scan of the queue (``gateway/queue_scan.py``): streams' notes
share a read within their period; the job API reads the queue as it is."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from gateway.admission import INFLOW_WINDOW_S, Inflow
from gateway.queue_scan import POSITION_SCAN, QueueScan, Waiting, entry_key
from gateway.snapshots import Snapshots
from shared.keys import CONSUMER_GROUP


def test_a_position_counts_the_entries_ahead_and_their_tokens() -> None:
    waiting = Waiting(entry_key("5-0"), [entry_key(e) for e in ("6-0", "6-1", "9-0")], [10, 30, 60])
    assert waiting.ahead("6-0") == (0, 0)
    assert waiting.ahead("9-0") == (2, 30)
    assert waiting.ahead("12-0") == (3, 60)  # queued after the scan: everything scanned is ahead
    assert waiting.ahead("5-0") is None  # delivered: started, not queued
    assert waiting.ahead("7-0") is None  # among the scanned ones once, not now: cancelled
    assert entry_key("10-0") > entry_key("9-5")  # ids order by number, not text


async def test_notes_share_one_read_within_their_period(redis: Redis) -> None:
    queue = "{m}:q"
    await redis.xgroup_create(queue, CONSUMER_GROUP, id="0", mkstream=True)
    first = await redis.xadd(queue, {"job": "a", "cost": 100})
    scan = QueueScan(redis)
    assert (await scan.get(queue, 60.0)).ahead(first) == (0, 0)
    second = await redis.xadd(queue, {"job": "b", "cost": 50})
    assert (await scan.get(queue, 60.0)).ahead(second) == (1, 100)  # the shared, older read
    await redis.xreadgroup(CONSUMER_GROUP, "w", {queue: ">"}, count=1)  # a worker takes a
    assert (await scan.get(queue, 60.0)).ahead(first) == (0, 0)  # not seen yet: a note's lag
    fresh = await scan.get(queue, 0.0)  # the job API
    assert fresh.ahead(first) is None and fresh.ahead(second) == (0, 0)


async def test_a_scan_reads_at_most_position_scan_entries(redis: Redis) -> None:
    queue = "{m}:long"
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(POSITION_SCAN + 10):
            pipe.xadd(queue, {"job": f"j{i}", "cost": 1}, id=f"{i + 1}-0")
        await pipe.execute()
    waiting = await QueueScan(redis).get(queue, 0.0)  # no group yet: all of it waits
    assert len(waiting.entries) == POSITION_SCAN
    assert waiting.ahead(f"{POSITION_SCAN + 5}-0") == (POSITION_SCAN, POSITION_SCAN)  # a floor


def test_the_inflow_is_a_running_sum_over_its_window() -> None:
    inflow = Inflow()
    inflow.add(0.0, 100)
    inflow.add(1.0, 50)
    assert inflow.rate(1.0) == 150 / INFLOW_WINDOW_S
    assert inflow.rate(INFLOW_WINDOW_S + 0.5) == 50 / INFLOW_WINDOW_S  # the first one left
    assert inflow.rate(INFLOW_WINDOW_S + 2.0) == 0.0 and not inflow.window


async def test_snapshots_share_a_read_and_drop_keys_nobody_reads() -> None:
    reads: list[str] = []
    gate = asyncio.Event()

    async def read(key: str) -> str:
        reads.append(key)
        await gate.wait()
        return f"value of {key}"

    snapshots = Snapshots(read, keep_s=0.05)
    first = asyncio.ensure_future(snapshots.get("a", 10.0))
    second = asyncio.ensure_future(snapshots.get("a", 10.0))
    gone = asyncio.ensure_future(snapshots.get("a", 10.0))
    await asyncio.sleep(0)
    gone.cancel()  # a reader that leaves does not cancel the read for the others
    gate.set()
    assert await first == await second == "value of a" and reads == ["a"]
    assert await snapshots.get("a", 10.0) == "value of a" and reads == ["a"]  # fresh enough
    await asyncio.sleep(0.1)
    await snapshots.get("b", 10.0)  # storing b drops a, unread for longer than keep_s
    assert set(snapshots.values) == {"b"}
