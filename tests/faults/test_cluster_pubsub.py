"""Sharded pub/sub on a real Redis Cluster: leaving channels of several slots that one node
owns keeps the connection (a node refuses a ``SUNSUBSCRIBE`` naming several slots with
``CROSSSLOT``, which the reader used to take for a changed slot map: it dropped the link and
sent every stream on it to the log)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest

from shared.pubsub import ShardedSubscriber
from shared.redis import connect
from tests.faults.redis_cluster import RedisClusterSet

pytestmark = pytest.mark.timeout(90)


async def test_leaving_channels_of_several_slots_on_one_node_keeps_the_link() -> None:
    group = RedisClusterSet.start()
    client = connect(group.url)
    heard: list[str] = []
    lost: list[str] = []

    def on_lost(channels: Iterable[str]) -> None:
        lost.extend(channels)

    sub = ShardedSubscriber(client, lambda channel, data: heard.append(data), on_lost)
    try:
        port = group.master_for_model("m-0")
        models = [m for m in (f"m-{i}" for i in range(1000)) if group.master_for_model(m) == port]
        slots = {group.slot_of_model(m): m for m in models}
        assert len(slots) >= 3, "three models on one master"
        a, b, kept = (f"slip:{{{m}}}:job:x:events" for m in list(slots.values())[:3])
        for channel in (a, b, kept):
            await sub.subscribe(channel)
        await sub.unsubscribe([a, b])
        node = group.client(port)
        for i in range(250):  # bounded: 5 s
            node.spublish(kept, f"after {i}")
            if heard:
                break
            await asyncio.sleep(0.02)
        assert heard, "the channel kept was never heard"
        await asyncio.sleep(0.2)  # a CROSSSLOT reply would have dropped the link by now
        assert sub.reconnects == 0 and lost == []
        assert set(node.execute_command("PUBSUB", "SHARDCHANNELS")) == {kept}
    finally:
        await sub.close()
        await client.aclose()
        group.stop()
