"""The gateway's one pub/sub connection against real Redis: when it drops, every stream is
told to repair from its job's log, whether our read loop or redis-py's retry reconnects it."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from gateway.multiplexer import PubSubMultiplexer


async def test_a_dropped_connection_marks_every_stream_for_repair(redis: Redis) -> None:
    mux = PubSubMultiplexer(redis, queue_size=16)
    await mux.start()
    try:
        a, b = await mux.subscribe("chan-a"), await mux.subscribe("chan-b")
        await redis.spublish("chan-a", "before")
        assert await a.wait(2.0) and a.take() == ["before"]
        assert not a.lagging and not b.lagging
        killed = await redis.client_kill_filter(_type="pubsub")
        assert killed >= 1
        for _ in range(100):  # bounded: 5 s
            if a.lagging and b.lagging:
                break
            await asyncio.sleep(0.05)
        assert a.lagging and b.lagging  # what was published meanwhile is lost: repair
        assert mux.reconnects >= 1
        b.lagging = False  # the stream repaired from its log (what the relay does)
        for _ in range(100):  # and the resubscribed connection delivers again
            await redis.spublish("chan-b", "after")
            if await b.wait(0.05) and "after" in b.take():
                break
        else:
            raise AssertionError("no delivery after the reconnect")
    finally:
        await mux.close()
