"""One pub/sub connection per gateway process, fanned out to bounded per-stream queues.

Listeners never block the reader: when a listener's queue is full its message is dropped and
the listener is marked ``lagging``; it then repairs from the job's event log (the source of
truth). The same happens to every listener when the connection drops and is re-established.

Timeouts of thousands of streams share one ``Deadlines`` wheel instead of a timer each: a
stream waits for its next event many times a second at scale, and a timer (or an
``asyncio.timeout``) per wait was a tenth of the relay's CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from typing import Any, Protocol

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from shared.aio import cancel_and_wait

log = structlog.get_logger("slipstream.gateway")

TICK_S = 0.05  # how late a timeout may fire (never early)


class Expiring(Protocol):
    def expire(self, now: float) -> None: ...


class Deadlines:
    """A timer wheel for coarse timeouts: ``add(when, item)`` calls ``item.expire(now)`` within
    one tick after ``when`` (monotonic seconds). Adding is a list append; ``tick`` pops only
    the buckets that came due. Items decide what an expiry means (a deadline that moved later
    re-adds itself), so the wheel holds at most one entry per armed item in practice.
    """

    __slots__ = ("buckets", "done", "tick")

    def __init__(self, tick: float = TICK_S) -> None:
        self.tick = tick
        self.buckets: dict[int, list[Expiring]] = {}
        self.done = math.floor(time.monotonic() / tick)  # every bucket up to this one fired

    def add(self, when: float, item: Expiring) -> None:
        key = max(math.ceil(when / self.tick), self.done + 1)
        bucket = self.buckets.get(key)
        if bucket is None:
            self.buckets[key] = [item]
        else:
            bucket.append(item)

    def fire(self, now: float) -> None:
        """Expire every item whose bucket is due at ``now``."""
        due = math.floor(now / self.tick)
        if due - self.done > len(self.buckets):  # a long pause: look only at what exists
            keys = sorted(k for k in self.buckets if k <= due)
        else:
            keys = list(range(self.done + 1, due + 1))
        self.done = max(self.done, due)
        for key in keys:
            for item in self.buckets.pop(key, ()):
                try:
                    item.expire(now)
                except Exception:  # one broken item must not stop every stream's timeouts
                    log.exception("deadline_expiry_failed")


class Listener:
    """What one stream receives: raw batch JSON, plus a flag saying "you missed something".

    Lean, because there is one per open stream: a list (an empty ``deque`` or an
    ``asyncio.Queue`` costs over half a kilobyte), a future that exists only while the
    stream's reader waits (an ``asyncio.Event`` keeps a deque of waiters for good), and its
    wait's deadline in the shared ``Deadlines`` (armed at most once at a time).
    """

    __slots__ = ("armed", "channel", "deadlines", "lagging", "queue", "size", "until", "waiter")

    def __init__(self, channel: str, size: int, deadlines: Deadlines) -> None:
        self.channel = channel
        self.size = size
        self.deadlines = deadlines
        self.queue: list[str] = []
        self.lagging = False
        self.waiter: asyncio.Future[None] | None = None
        self.until = 0.0  # the current wait's deadline (monotonic)
        self.armed = math.inf  # when the wheel will next look at this listener

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
        return await self.wait_until(time.monotonic() + timeout)

    async def wait_until(self, until: float) -> bool:
        """Wait until ``until`` (monotonic, at most a tick late) for a delivery; False when
        none came. No timer of its own: the wheel wakes it."""
        if self.queue or self.lagging:
            return True
        self.until = until
        if until < self.armed:  # already armed for an earlier time: that expiry re-arms
            self.armed = until
            self.deadlines.add(until, self)
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None
        return bool(self.queue) or self.lagging

    def expire(self, now: float) -> None:
        self.armed = math.inf
        if self.waiter is None:
            return
        if self.until <= now:
            self._wake()
        else:  # the wait now running ends later than the one that armed the wheel
            self.armed = self.until
            self.deadlines.add(self.until, self)

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
        self.deadlines = Deadlines()
        # channels no stream listens to any more: unsubscribed in one command per tick (a
        # command per finished stream was a round trip of Redis's time per request)
        self._leaving: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self._connect()
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="pubsub-multiplexer"),
            asyncio.create_task(self._tick_loop(), name="stream-deadlines"),
        ]

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        if self.pubsub is not None:
            await self._release(self.pubsub)

    async def _connect(self) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.home_channel, *self.listeners)
        self._leaving.clear()  # a new connection subscribes only to what is listened to
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
        listener = Listener(channel, self.queue_size, self.deadlines)
        group = self.listeners.setdefault(channel, set())
        group.add(listener)
        if len(group) == 1 and channel in self._leaving:
            self._leaving.discard(channel)  # never left: still subscribed
        elif len(group) == 1 and self.pubsub is not None:
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
            self._leaving.add(listener.channel)  # one UNSUBSCRIBE for many, at the next tick

    async def _tick_loop(self) -> None:
        """Drives the ``Deadlines`` wheel that every stream's timeouts share."""
        while True:
            await asyncio.sleep(self.deadlines.tick)
            self.deadlines.fire(time.monotonic())
            if self._leaving and self.pubsub is not None:
                channels, self._leaving = list(self._leaving), set()
                with contextlib.suppress(RedisError, OSError):  # a reconnect forgets them anyway
                    await self.pubsub.unsubscribe(*channels)

    async def _read_loop(self) -> None:
        while True:
            try:
                assert self.pubsub is not None
                reply = await self._read(self.pubsub)
                if reply is None:
                    continue
                if reply[0] == "message":
                    for listener in self.listeners.get(reply[1], ()):
                        listener.deliver(reply[2])
                else:  # (un)subscribe confirmations: redis-py keeps its bookkeeping
                    await self.pubsub.handle_message(reply, True)  # type: ignore[no-untyped-call]
            except (RedisError, OSError) as exc:
                log.warning("pubsub_lost", error=str(exc))
                await self._reconnect()

    @staticmethod
    async def _read(pubsub: PubSub) -> Any:
        """The next reply on the pub/sub connection, straight from redis-py's parser.

        ``PubSub.get_message`` cost ~7 µs per message at 1,000 streams (a health check, the
        retry wrapper, an ``asyncio.timeout`` per read, a dict per message); this is the one
        read it makes, without the rest. Nothing is lost by it: a dead connection raises here,
        and ``_reconnect`` opens a new one and sends every stream to its log, as before.
        """
        conn = pubsub.connection
        if conn is None:
            raise RedisError("pub/sub connection not set")
        parser: Any = getattr(conn, "_parser", None)
        if parser is None:  # a redis-py without the attribute: its public, slower read
            return await conn.read_response(timeout=1.0, disconnect_on_error=False)
        return await parser.read_response()

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
