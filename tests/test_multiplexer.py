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


async def test_reply_listeners_share_one_channel_and_are_repaired_on_a_drop(
    redis: Redis,
) -> None:
    """Streams that submitted their jobs listen on one channel of the process, routed by the
    job id at the head of each message; a drop marks them for repair like any listener."""
    mux = PubSubMultiplexer(redis, queue_size=16)
    await mux.start()
    try:
        a, b = await asyncio.gather(
            mux.listen_for("ja", "replies"), mux.listen_for("jb", "replies")
        )
        assert dict(await redis.pubsub_shardnumsub("replies")) == {"replies": 1}  # once
        assert await redis.spublish("replies", 'jb {"x": 1}') == 1
        assert await b.wait(2.0) and b.take() == ['{"x": 1}']  # the job id is routing only
        assert a.take() == []  # another job's message is not a's
        await redis.spublish("replies", "unknown {}")  # nobody's: dropped, nothing breaks
        await mux.unsubscribe(a)
        await redis.spublish("replies", "ja {}")
        assert "ja" not in mux.by_job and a.take() == []
        assert dict(await redis.pubsub_shardnumsub("replies")) == {"replies": 1}  # kept
        assert await redis.client_kill_filter(_type="pubsub") >= 1
        for _ in range(100):  # bounded: 5 s
            if b.lagging:
                break
            await asyncio.sleep(0.05)
        assert b.lagging and not a.lagging  # b repairs from its log; a left before the drop
        b.lagging = False
        for _ in range(100):  # the channel was subscribed again on the new connection
            await redis.spublish("replies", "jb after")
            if await b.wait(0.05) and "after" in b.take():
                break
        else:
            raise AssertionError("no delivery after the reconnect")
    finally:
        await mux.close()


async def test_a_reply_channel_is_subscribed_once_and_waited_for(redis: Redis) -> None:
    """A request for a model whose reply channel is being subscribed waits until that
    ``SSUBSCRIBE`` went out (it queues its job right after); a failed first subscription is
    left to the subscriber's repair, not sent again by every request; a cancelled one is."""
    mux = PubSubMultiplexer(redis, queue_size=16)
    calls: list[str] = []
    gate = asyncio.Event()
    outcome: list[BaseException | None] = [None]

    async def subscribe(channel: str) -> None:  # the subscriber's send, held at ``gate``
        calls.append(channel)
        await gate.wait()
        if outcome[0] is not None:
            raise outcome[0]

    mux.subscriber.subscribe = subscribe  # type: ignore[method-assign]
    first = asyncio.create_task(mux.listen_for("j1", "r"))
    second = asyncio.create_task(mux.listen_for("j2", "r"))
    await asyncio.sleep(0.01)
    assert calls == ["r"] and not first.done() and not second.done()  # held for the send
    gate.set()
    a, b = await first, await second
    assert calls == ["r"] and not a.lagging and not b.lagging
    assert set(mux.by_job) == {"j1", "j2"}

    gate.clear()
    outcome[0] = ConnectionError("down")  # an OSError: the subscriber repairs it
    failing = asyncio.create_task(mux.listen_for("j3", "r2"))
    await asyncio.sleep(0.01)
    gate.set()
    assert (await failing).lagging  # it reads its log
    assert not (await mux.listen_for("j4", "r2")).lagging and calls == ["r", "r2"]

    gate.clear()
    outcome[0] = None
    cancelled = asyncio.create_task(mux.listen_for("j5", "r3"))
    waiting = asyncio.create_task(mux.listen_for("j6", "r3"))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    await asyncio.sleep(0.01)
    assert calls == ["r", "r2", "r3", "r3"]  # maybe never sent: the waiting one sends it
    gate.set()
    assert not (await waiting).lagging and "j5" not in mux.by_job


async def test_a_reply_message_reaches_a_stream_only_through_its_own_channel(
    redis: Redis,
) -> None:
    """A job id at the head of a message on another model's reply channel is not routed: a
    publisher allowed on one model's channels cannot reach another model's streams."""
    mux = PubSubMultiplexer(redis, queue_size=16)
    await mux.start()
    try:
        ours = await mux.listen_for("ja", "replies-a")
        await mux.listen_for("jb", "replies-b")
        assert await redis.spublish("replies-b", "ja forged") == 1
        assert await redis.spublish("replies-a", "ja real") == 1
        assert await ours.wait(2.0)
        await asyncio.sleep(0.05)
        assert ours.take() == ["real"]
    finally:
        await mux.close()
