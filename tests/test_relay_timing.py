"""The relay's shared timing: waits end on the ``Deadlines`` wheel (never early, at most a few
ticks late, without a timer each), and channels no stream listens to are unsubscribed in
batches at the next tick (a stream that comes back first keeps the subscription)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from redis.asyncio import Redis

from gateway.multiplexer import TICK_S, Deadlines, PubSubMultiplexer


class Seen:
    def __init__(self) -> None:
        self.at: list[float] = []

    def expire(self, now: float) -> None:
        self.at.append(now)


def test_the_wheel_fires_each_item_once_never_early() -> None:
    wheel = Deadlines(tick=0.05)
    start = time.monotonic()
    items = [(start + d, Seen()) for d in (0.01, 0.2, 0.2, 1.0)]
    for when, item in items:
        wheel.add(when, item)
    for step in range(1, 30):  # 1.45 s in ticks
        wheel.fire(start + step * 0.05)
    for when, item in items:
        assert len(item.at) == 1
        assert when <= item.at[0] <= when + 0.1
    assert not wheel.buckets


async def test_a_wait_ends_on_time_and_a_delivery_ends_it_at_once(redis: Redis) -> None:
    mux = PubSubMultiplexer(redis, queue_size=4)
    await mux.start()
    try:
        listener = await mux.subscribe("chan-timing")
        began = time.monotonic()
        assert not await listener.wait(0.3)  # nothing came
        waited = time.monotonic() - began
        assert 0.3 <= waited <= 0.3 + 4 * TICK_S + 0.2
        later = asyncio.create_task(listener.wait(30.0))
        await asyncio.sleep(0.05)
        await redis.spublish("chan-timing", "x")
        assert await asyncio.wait_for(later, 5.0)
        assert listener.take() == ["x"]
    finally:
        await mux.close()


async def numsub(redis: Redis, channel: str) -> int:
    return int(dict(await redis.pubsub_shardnumsub(channel))[channel])


async def test_unsubscribes_go_out_at_the_next_tick(redis: Redis) -> None:
    mux = PubSubMultiplexer(redis, queue_size=4)
    await mux.start()
    try:
        gone = await mux.subscribe("chan-gone")
        back = await mux.subscribe("chan-back")
        assert await numsub(redis, "chan-gone") == 1
        await mux.unsubscribe(gone)
        await mux.unsubscribe(back)
        back = await mux.subscribe("chan-back")  # before the tick: never left
        for _ in range(100):  # bounded: 5 s
            if await numsub(redis, "chan-gone") == 0:
                break
            await asyncio.sleep(0.05)
        assert await numsub(redis, "chan-gone") == 0
        assert await numsub(redis, "chan-back") == 1
        await redis.spublish("chan-back", "still here")
        assert await back.wait(5.0) and back.take() == ["still here"]
    finally:
        await mux.close()


class Broken:
    def expire(self, now: float) -> None:
        raise RuntimeError("broken")


def test_a_failing_item_does_not_stop_the_others() -> None:
    wheel = Deadlines(tick=0.05)
    start = time.monotonic()
    seen = Seen()
    wheel.add(start, Broken())
    wheel.add(start, seen)
    wheel.fire(start + 0.2)
    assert len(seen.at) == 1


@pytest.mark.parametrize("hard", [False, True])
async def test_messages_the_sink_takes_move_a_sliding_wait_on(redis: Redis, hard: bool) -> None:
    """A wait with ``slide`` ends ``slide`` after the last message its sink took, not at its
    first deadline (a stream written inline is not woken to find it was not quiet), and never
    after ``hard``."""
    mux = PubSubMultiplexer(redis, queue_size=4)
    await mux.start()
    try:
        listener = await mux.subscribe("chan-slide")
        taken: list[str] = []
        listener.sink = lambda data: taken.append(data) is None  # takes every message
        began = time.monotonic()
        limit = began + 0.6 if hard else math.inf

        async def timed() -> tuple[bool, float]:
            came = await listener.wait_until(began + 0.3, slide=0.3, hard=limit)
            return came, time.monotonic() - began

        wait = asyncio.create_task(timed())
        for i in range(10):  # one message every 0.1 s for 1 s, each taken by the sink
            await redis.spublish("chan-slide", str(i))
            await asyncio.sleep(0.1)
        came, waited = await asyncio.wait_for(wait, 5.0)
        assert not came
        if hard:
            assert 0.6 <= waited <= 0.6 + 4 * TICK_S + 0.2
        else:  # 0.3 s after the last message (sent at ~0.9 s)
            assert 1.2 <= waited <= 1.3 + 4 * TICK_S + 0.2
            assert len(taken) == 10 and listener.take() == []
    finally:
        await mux.close()
