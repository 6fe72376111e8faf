"""Sharded pub/sub (``SSUBSCRIBE``/``SPUBLISH``, Redis 7): one connection per Redis node that
owns subscribed channels, following the channels when their slot moves or their node dies.

Why sharded everywhere, not only in Redis Cluster: classic ``PUBLISH`` in a cluster is sent to
every node of it (each node's CPU pays for every model's tokens), while ``SPUBLISH`` stays on
the node owning the channel's slot, with the model's other keys (channels carry the
``{model}`` hash tag, ``shared/keys.py``). On a single server or a Sentinel master the two cost
the same, so one path serves every deployment; it needs Redis 7.0 or later.

The ordering rule: after a connection is lost, a channel's subscriber hears ``lost`` twice,
once at once (so it reads the job log instead of waiting for messages that may never come) and
once after ``SSUBSCRIBE`` went out on the new connection (whatever was published in between is
in the log, and from then on nothing is missed). A reply Redis sends to a connection is read by
that connection's reader task only; commands go out without waiting for their replies.

``redis.asyncio``'s ``PubSub`` is not used: it has no sharded commands, resubscribes only
classic channels after its own reconnects, and its health check reads replies on the same
connection as the reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot
from redis.exceptions import RedisError, ResponseError

from shared.aio import cancel_and_wait
from shared.redis import RedisClient, forget_slot_map, node_name, open_node_connection

log = structlog.get_logger("slipstream.pubsub")

OnMessage = Callable[[str, str], None]  # channel, data
OnLost = Callable[[Iterable[str]], None]  # channels whose messages may have been missed

KEEPALIVE_S = 5.0  # PING an idle connection this often; silent for 3x this: dead


class ShardLink:
    """One pub/sub connection to one node and the channels subscribed on it."""

    __slots__ = ("channels", "connection", "last_read", "node")

    def __init__(self, node: str, connection: AbstractConnection) -> None:
        self.node = node
        self.connection = connection
        self.channels: set[str] = set()
        self.last_read = time.monotonic()

    async def send(self, *command: str) -> None:
        # check_health=False: redis-py's health check would read the PING's reply itself
        await self.connection.send_command(*command, check_health=False)

    async def read(self) -> Any:
        """The next reply, straight from redis-py's parser (no timeout per read, no retry
        wrapper, no dict per message: at thousands of streams ``PubSub.get_message`` cost
        ~7 µs a message). A dead connection raises here."""
        parser: Any = getattr(self.connection, "_parser", None)
        if parser is None:  # a redis-py without the attribute: its public, slower read
            reply = await self.connection.read_response(timeout=None, disconnect_on_error=False)
        else:
            reply = await parser.read_response()
        self.last_read = time.monotonic()
        return reply

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.connection.disconnect()


class ShardedSubscriber:
    """Subscriptions to sharded channels over one ``ShardLink`` per owning node.

    ``on_message`` runs in a link's reader task for every message; ``on_lost`` as described in
    the module's docstring. ``reconnects`` counts links lost.
    """

    def __init__(self, client: RedisClient, on_message: OnMessage, on_lost: OnLost) -> None:
        self.client = client
        self.on_message = on_message
        self.on_lost = on_lost
        self.links: dict[str, ShardLink] = {}
        self.wanted: set[str] = set()  # every channel someone listens to
        self.reconnects = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # one link per node even when two subscribe at once; a lock per node so that a node
        # being reconnected to does not hold up subscriptions on the others
        self._locks: dict[str, asyncio.Lock] = {}

    async def close(self) -> None:
        await cancel_and_wait(list(self._tasks))
        for link in list(self.links.values()):
            await link.close()
        self.links.clear()

    async def subscribe(self, *channels: str) -> None:
        """Subscribe ``channels``, all of one hash slot, on their node in one ``SSUBSCRIBE``
        (raises ``RedisError``/``OSError`` when that node cannot be reached; the channels are
        then repaired in the background and ``on_lost`` follows)."""
        self.wanted.update(channels)
        try:
            link = await self._link_for(channels[0])
            placed = [c for c in channels if c in self.wanted]  # not left while it waited
            if placed:
                link.channels.update(placed)
                await link.send("SSUBSCRIBE", *placed)
        except (RedisError, OSError):
            self._spawn(self._repair(list(channels)))
            raise

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        """Leave ``channels``: one ``SUNSUBSCRIBE`` per link and hash slot (a Redis Cluster
        node refuses one naming several slots with ``CROSSSLOT``, which the reader took for a
        changed slot map: it dropped the link and sent every stream on it to the log). A lost
        link forgets them anyway."""
        by_slot: dict[tuple[str, int], list[str]] = {}
        for channel in channels:
            self.wanted.discard(channel)
            for link in self.links.values():
                if channel in link.channels:
                    link.channels.discard(channel)
                    by_slot.setdefault((link.node, key_slot(channel.encode())), []).append(channel)
        for (node, _), names in by_slot.items():
            with contextlib.suppress(RedisError, OSError):
                await self.links[node].send("SUNSUBSCRIBE", *names)

    async def keepalive(self) -> None:
        """PING every link; drop one silent for three keepalive periods (a half-open TCP
        connection never raises by itself). Call it every ``KEEPALIVE_S``."""
        now = time.monotonic()
        for link in list(self.links.values()):
            if now - link.last_read > 3 * KEEPALIVE_S:
                log.warning("pubsub_silent", node=link.node)
                await link.close()  # its reader raises and repairs
                continue
            with contextlib.suppress(RedisError, OSError):
                await link.send("PING")

    async def _place(self, channels: list[str]) -> None:
        """Subscribe each channel on the link of the node owning it now."""
        for channel in channels:
            if channel not in self.wanted:
                continue  # left while it waited
            link = await self._link_for(channel)
            link.channels.add(channel)
            await link.send("SSUBSCRIBE", channel)

    async def _link_for(self, channel: str) -> ShardLink:
        node = await node_name(self.client, channel)
        async with self._locks.setdefault(node, asyncio.Lock()):
            link = self.links.get(node)
            if link is None:
                connection = await open_node_connection(self.client, channel)
                link = self.links[node] = ShardLink(node, connection)
                self._spawn(self._read_loop(link))
            return link

    async def _read_loop(self, link: ShardLink) -> None:
        try:
            while True:
                reply = await link.read()
                if isinstance(reply, list) and reply and reply[0] == "smessage":
                    self.on_message(reply[1], reply[2])
                elif isinstance(reply, ResponseError):  # MOVED: the slot map changed
                    raise reply
                elif isinstance(reply, list) and reply and reply[0] == "sunsubscribe":
                    self._dropped_by_server(link, reply[1])
        except (RedisError, OSError) as exc:
            log.warning("pubsub_lost", node=link.node, error=str(exc))
        if self.links.get(link.node) is link:
            del self.links[link.node]
        await link.close()
        self.reconnects += 1
        forget_slot_map(self.client)
        channels = [c for c in link.channels if c in self.wanted]
        link.channels.clear()
        if channels:
            await self._repair(channels)

    def _dropped_by_server(self, link: ShardLink, channel: str) -> None:
        """Redis unsubscribes a slot's channels when the slot leaves the node; follow it."""
        if channel in link.channels and channel in self.wanted:
            link.channels.discard(channel)
            forget_slot_map(self.client)
            self._spawn(self._repair([channel]))

    async def _repair(self, channels: list[str]) -> None:
        """Resubscribe ``channels`` where their slots live now, retrying with backoff while no
        node will take them (a failover in progress); ``on_lost`` before and after."""
        self.on_lost(channels)
        delay = 0.05
        while True:
            try:
                await self._place(channels)
                break
            except (RedisError, OSError) as exc:
                log.warning("pubsub_resubscribe_failed", error=str(exc))
                forget_slot_map(self.client)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.on_lost([c for c in channels if c in self.wanted])

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
