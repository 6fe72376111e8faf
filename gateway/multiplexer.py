"""Every stream's pub/sub subscription in a gateway process, fanned out to bounded
per-stream queues (the connections themselves: ``shared/pubsub.py``).

Listeners never block the reader: when a listener's queue is full its message is dropped and
the listener is marked ``lagging``; it then repairs from the job's event log (the source of
truth). The same happens to every listener when the connection drops and is re-established.

Timeouts of thousands of streams share one ``Deadlines`` wheel instead of a timer each: a
stream waits for its next event many times a second at scale, and a timer (or an
``asyncio.timeout``) per wait was a tenth of the relay's CPU.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import structlog
from redis.exceptions import RedisError

from gateway.spare_channels import SpareChannels
from shared.aio import cancel_and_wait
from shared.pubsub import KEEPALIVE_S, ShardedSubscriber
from shared.redis import RedisClient

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

    __slots__ = (
        "armed",
        "channel",
        "deadlines",
        "hard",
        "lagging",
        "queue",
        "sink",
        "size",
        "slide",
        "until",
        "waiter",
    )

    def __init__(self, channel: str, size: int, deadlines: Deadlines) -> None:
        self.channel = channel
        self.size = size
        self.deadlines = deadlines
        self.queue: list[str] = []
        self.lagging = False
        self.waiter: asyncio.Future[None] | None = None
        self.until = 0.0  # the current wait's deadline (monotonic)
        self.slide = 0.0  # ... moved to this long after each message the sink takes
        self.hard = math.inf  # ... but never past this
        self.armed = math.inf  # when the wheel will next look at this listener
        # Offered each delivery while the stream's reader waits with nothing queued; True
        # means it took the message (``gateway/inline_relay.py``), so nobody is woken.
        self.sink: Callable[[str], bool] | None = None

    def deliver(self, data: str) -> bool:
        """Hand ``data`` over; True when the sink took it inline (nobody woken)."""
        sink = self.sink
        if sink is not None and self.waiter is not None and not self.queue and not self.lagging:
            try:
                if sink(data):
                    if self.slide:  # the stream was not quiet: its wait ends later
                        self.until = min(self.hard, max(self.until, time.monotonic() + self.slide))
                    return True
            except (Exception, asyncio.CancelledError):  # raised by the sink itself (nothing
                # is cancelled in the middle of a plain call): the task's path takes the
                # message as it came, and this stream stops offering
                log.exception("inline_relay_failed", channel=self.channel)
                self.sink = None
        if len(self.queue) < self.size:
            self.queue.append(data)
        else:
            self.lagging = True
        self._wake()
        return False

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

    async def wait_until(self, until: float, *, slide: float = 0.0, hard: float = math.inf) -> bool:
        """Wait until ``until`` (monotonic, at most a tick late) for a delivery; False when
        none came. No timer of its own: the wheel wakes it.

        ``slide``: each message the sink takes moves ``until`` to ``slide`` seconds after it
        (never earlier, never past ``hard``). For a wait whose every deadline is "so long
        after the last event" but ``hard``: at 10,000 streams each woke its task every ping
        period only to find the sink had written meanwhile (a fifth as many wake-ups as
        events)."""
        if self.queue or self.lagging:
            return True
        self.until, self.slide, self.hard = until, slide, hard
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
    """Every stream's subscription, over one ``ShardedSubscriber`` (a pub/sub connection per
    Redis node owning subscribed channels: one on a single server, one per shard in Redis
    Cluster). A lost connection sends its channels' streams to their logs (``on_lost``).
    With ``spares``, new jobs' channels are subscribed ahead (``spare_id``)."""

    def __init__(
        self, redis: RedisClient, *, queue_size: int, spares: SpareChannels | None = None
    ) -> None:
        self.queue_size = queue_size
        self.spares = spares
        self.listeners: dict[str, set[Listener]] = {}
        self.subscriber = ShardedSubscriber(redis, self._deliver, self._lost)
        self.deadlines = Deadlines()
        # channels no stream listens to any more: unsubscribed in one command per tick (a
        # command per finished stream was a round trip of Redis's time per request)
        self._leaving: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.delivered = 0  # messages handed to listeners (one per listener of a channel)
        self.inline = 0  # ... of which a listener's sink took at once

    @property
    def reconnects(self) -> int:
        """Pub/sub connections lost (and re-established) so far, over every node."""
        return self.subscriber.reconnects

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._tick_loop(), name="stream-deadlines")]
        if self.spares is not None:
            self._tasks.append(asyncio.create_task(self._spares_loop(self.spares), name="spares"))

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        await self.subscriber.close()

    def spare_id(self, model: str) -> str | None:
        """An id for a new job of ``model`` whose events a stream here will follow, whose
        channel is subscribed already; None when there is none (or no spares are kept)."""
        return None if self.spares is None else self.spares.take(model)

    def _deliver(self, channel: str, data: str) -> None:
        for listener in self.listeners.get(channel, ()):
            self.delivered += 1
            if listener.deliver(data):
                self.inline += 1

    def _lost(self, channels: Iterable[str]) -> None:
        channels = list(channels)
        for channel in channels:
            for listener in self.listeners.get(channel, ()):
                listener.mark_lagging()
        if self.spares is not None:
            self._leaving.update(self.spares.drop(channels))

    async def subscribe(self, channel: str) -> Listener:
        listener = Listener(channel, self.queue_size, self.deadlines)
        group = self.listeners.setdefault(channel, set())
        group.add(listener)
        if len(group) == 1 and channel in self._leaving:
            self._leaving.discard(channel)  # never left: still subscribed
        elif len(group) == 1 and not (self.spares is not None and self.spares.claim(channel)):
            try:
                await self.subscriber.subscribe(channel)
            except (RedisError, OSError):
                listener.mark_lagging()  # repaired in the background; the log has the events
        return listener

    async def unsubscribe(self, listener: Listener) -> None:
        group = self.listeners.get(listener.channel)
        if group is None:
            return
        group.discard(listener)
        if not group:
            del self.listeners[listener.channel]
            self._leaving.add(listener.channel)  # one SUNSUBSCRIBE for many, at the next tick

    async def _spares_loop(self, spares: SpareChannels) -> None:
        """Refills the spares each tick, apart from ``_tick_loop``: a subscription may wait
        for a connection to Redis, which the streams' timeouts must not."""
        while True:
            await asyncio.sleep(self.deadlines.tick)
            await self._refill(spares)

    async def _refill(self, spares: SpareChannels) -> None:
        """Subscribe new spares (one ``SSUBSCRIBE`` per model); leave the surplus."""
        new, leave = spares.refill()
        self._leaving.update(c for c in leave if c not in self.listeners)
        for model, ids in new.items():
            channels = [spares.channel_of(model, i) for i in ids]
            try:
                await self.subscriber.subscribe(*channels)
            except (RedisError, OSError):  # not worth a repair: a stream can do without
                await self.subscriber.unsubscribe(channels)
                continue
            self._leaving.update(spares.add(model, ids))

    async def _tick_loop(self) -> None:
        """Drives the ``Deadlines`` wheel that every stream's timeouts share, the batched
        unsubscribes, and the subscriber's keepalive."""
        next_keepalive = time.monotonic() + KEEPALIVE_S
        while True:
            await asyncio.sleep(self.deadlines.tick)
            now = time.monotonic()
            self.deadlines.fire(now)
            if self._leaving:
                channels, self._leaving = list(self._leaving), set()
                await self.subscriber.unsubscribe(channels)
            if now >= next_keepalive:
                next_keepalive = now + KEEPALIVE_S
                await self.subscriber.keepalive()
