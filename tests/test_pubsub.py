"""Sharded pub/sub connections (``shared/pubsub.py``) against a real Redis: the order of
``lost`` around a reconnection, and a silent (half-open) connection found by the keepalive."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterable
from typing import Any

import pytest
from redis.asyncio import Redis

from shared import pubsub
from shared.pubsub import ShardedSubscriber
from shared.redis import connect
from tests.helpers import start_redis


class Heard:
    """What a subscriber's callbacks saw, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []

    def message(self, channel: str, data: str) -> None:
        self.log.append(("message", data))

    def lost(self, channels: Iterable[str]) -> None:
        self.log.append(("lost", ",".join(sorted(channels))))

    async def until(self, entry: tuple[str, str], timeout: float = 10.0) -> None:
        for _ in range(int(timeout / 0.02)):  # bounded
            if entry in self.log:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"never heard {entry}: {self.log}")


async def publish_until_heard(redis: Any, heard: Heard, channel: str, data: str) -> None:
    for _ in range(250):  # bounded: 5 s
        await redis.spublish(channel, data)
        if ("message", data) in heard.log:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{data!r} never delivered: {heard.log}")


async def test_lost_is_said_before_and_after_the_resubscription(redis: Redis) -> None:
    heard = Heard()
    client = connect(f"redis://127.0.0.1:{redis.connection_pool.connection_kwargs['port']}/0")
    sub = ShardedSubscriber(client, heard.message, heard.lost)
    try:
        await sub.subscribe("ch-1")
        await publish_until_heard(redis, heard, "ch-1", "first")
        assert await redis.client_kill_filter(_type="pubsub") >= 1
        await heard.until(("lost", "ch-1"))
        for _ in range(250):  # the second "lost" comes once SSUBSCRIBE went out again
            if heard.log.count(("lost", "ch-1")) == 2:
                break
            await asyncio.sleep(0.02)
        assert heard.log.count(("lost", "ch-1")) == 2, heard.log
        await publish_until_heard(redis, heard, "ch-1", "after")
        assert sub.reconnects == 1
        assert heard.log.index(("lost", "ch-1")) > heard.log.index(("message", "first"))
    finally:
        await sub.close()
        await client.aclose()


async def test_a_silent_connection_is_dropped_and_resubscribed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGSTOP the server: no error ever reaches the reader (the TCP connection stays up), so
    only the keepalive can tell; after SIGCONT the channel is subscribed again."""
    monkeypatch.setattr(pubsub, "KEEPALIVE_S", 0.2)
    server = start_redis()
    heard = Heard()
    client = connect(server.url, socket_timeout=2.0)
    sub = ShardedSubscriber(client, heard.message, heard.lost)
    try:
        await sub.subscribe("ch-2")
        await publish_until_heard(client, heard, "ch-2", "first")
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(0.8)  # > 3 keepalive periods without a reply
            await sub.keepalive()
            await heard.until(("lost", "ch-2"), timeout=5.0)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert sub.reconnects == 1
        await publish_until_heard(client, heard, "ch-2", "after")
    finally:
        await sub.close()
        await client.aclose()
        server.stop(kill=True)
