"""One pub/sub connection per gateway process, fanned out to bounded per-stream queues.

Listeners never block the reader: when a listener's queue is full its message is dropped and
the listener is marked ``lagging``; it then repairs from the job's event log (the source of
truth). The same happens to every listener when the connection drops and is re-established.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from shared.aio import cancel_and_wait

log = structlog.get_logger("slipstream.gateway")


class Listener:
    """What one stream receives: raw batch JSON, plus a flag saying "you missed something".

    Lean, because there is one per open stream: a list (an empty ``deque`` or an
    ``asyncio.Queue`` costs over half a kilobyte) and a future that exists only while the
    stream's reader waits (an ``asyncio.Event`` keeps a deque of waiters for good).
    """

    __slots__ = ("channel", "lagging", "queue", "size", "waiter")

    def __init__(self, channel: str, size: int) -> None:
        self.channel = channel
        self.size = size
        self.queue: list[str] = []
        self.lagging = False
        self.waiter: asyncio.Future[None] | None = None

    def deliver(self, data: str) -> None:
        if len(self.queue) < self.size:
            self.queue.append(data)
        else:
            self.lagging = True
        self._wake()

    def mark_lagging(self) -> None:
        self.lagging = True
        self._wake()

    def take(self) -> list[str]:
        """Everything delivered so far, oldest first."""
        taken, self.queue = self.queue, []
        return taken

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a delivery; False when none came."""
        if self.queue or self.lagging:
            return True
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):  # no task per wait, unlike wait_for
                await self.waiter
            return True
        except TimeoutError:
            return False
        finally:
            self.waiter = None

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class PubSubMultiplexer:
    def __init__(self, redis: Redis, *, queue_size: int, home_channel: str = "") -> None:
        self.redis = redis
        self.queue_size = queue_size
        self.home_channel = home_channel or f"slip:gateway:{uuid.uuid4().hex}"
        self.listeners: dict[str, set[Listener]] = {}
        self.pubsub: PubSub | None = None
        self.reconnects = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._connect()
        self._task = asyncio.create_task(self._read_loop(), name="pubsub-multiplexer")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
        if self.pubsub is not None:
            await self._release(self.pubsub)

    async def _connect(self) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.home_channel, *self.listeners)
        if pubsub.connection is not None:  # redis-py reconnects (and resubscribes) by itself
            pubsub.connection.register_connect_callback(self._reconnected)
        self.pubsub = pubsub

    async def _reconnected(self, _connection: object) -> None:
        """redis-py re-established the pub/sub connection on its own (its retry policy):
        whatever was published while it was down is lost, so every stream repairs from the log."""
        log.warning("pubsub_reconnected")
        self.reconnects += 1
        self._mark_all_lagging()

    def _mark_all_lagging(self) -> None:
        for group in self.listeners.values():
            for listener in group:
                listener.mark_lagging()

    async def _release(self, pubsub: PubSub) -> None:
        if pubsub.connection is not None:
            pubsub.connection.deregister_connect_callback(self._reconnected)
        with contextlib.suppress(RedisError, OSError):
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def subscribe(self, channel: str) -> Listener:
        listener = Listener(channel, self.queue_size)
        group = self.listeners.setdefault(channel, set())
        group.add(listener)
        if len(group) == 1 and self.pubsub is not None:
            try:
                await self.pubsub.subscribe(channel)
            except (RedisError, OSError):
                listener.mark_lagging()  # the reconnect resubscribes; the log has the events
        return listener

    async def unsubscribe(self, listener: Listener) -> None:
        group = self.listeners.get(listener.channel)
        if group is None:
            return
        group.discard(listener)
        if not group:
            del self.listeners[listener.channel]
            if self.pubsub is not None:
                with contextlib.suppress(RedisError, OSError):
                    await self.pubsub.unsubscribe(listener.channel)

    async def _read_loop(self) -> None:
        while True:
            try:
                assert self.pubsub is not None
                message = await self.pubsub.get_message(timeout=1.0)
                if message is not None and message.get("type") == "message":
                    for listener in self.listeners.get(message["channel"], ()):
                        listener.deliver(message["data"])
            except (RedisError, OSError) as exc:
                log.warning("pubsub_lost", error=str(exc))
                await self._reconnect()

    async def _reconnect(self) -> None:
        old, self.pubsub = self.pubsub, None
        if old is not None:
            await self._release(old)
        delay = 0.05
        while True:
            try:
                await self._connect()
                break
            except (RedisError, OSError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.reconnects += 1
        self._mark_all_lagging()
