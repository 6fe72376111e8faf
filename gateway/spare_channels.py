"""``SpareChannels``: job ids whose event channels are subscribed before their jobs exist.

A streamed or collected request subscribes to its job's channel before it queues the job, so
that no event can come before the subscription. Sent on the request's path, that
``SSUBSCRIBE`` woke Redis (on a shared core it ran before the gateway went on) and cost the
gateway a command's work: with the route shortcuts of ``gateway/entry.py``, ~0.09 ms of the
first token's time (docs/benchmarks.md, round 11). So the multiplexer keeps, per model, a few
ids whose channels it subscribed ahead, all of a model's in one ``SSUBSCRIBE`` per tick (one
hash slot: the model's tag), and a request that follows its job takes one (``take``) in
place of the id it was built with.

The trade-off is idle subscriptions in Redis, bounded here: a model's spares are refilled to
twice its demand (the ids asked for in a tick, decaying by a fifth a tick when fewer are), at
least ``least`` and at most ``most``, and only for models asked for (at most ``MODELS`` of
them; others get plain ids); spares beyond twice that are left. An id taken but never
listened to (its request was refused by a later gate, or found its idempotent original) is
left after ``UNCLAIMED_S``; a model not asked for in ``IDLE_S`` loses its spares; spares whose
connection is lost are dropped (a stream must not take one before it is subscribed again).
Nothing depends on a spare for correctness: a listener that finds its channel not (or no
longer) subscribed subscribes it as before.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterable

MODELS = 64  # models with spares of their own (a bound on what unknown traffic can pin)
UNCLAIMED_S = 10.0  # an id taken this long ago and never listened to is left
IDLE_S = 60.0  # a model not asked for this long loses its spares (and its place)


class SpareChannels:
    """The ids themselves; the multiplexer subscribes and leaves their channels (``refill``,
    once a tick)."""

    __slots__ = (
        "asked_at",
        "channel_of",
        "demand",
        "idle_s",
        "least",
        "most",
        "pools",
        "taken",
        "took",
        "unclaimed_s",
    )

    def __init__(
        self,
        channel_of: Callable[[str, str], str],
        *,
        least: int = 4,
        most: int = 256,
        unclaimed_s: float = UNCLAIMED_S,
        idle_s: float = IDLE_S,
    ) -> None:
        self.channel_of = channel_of  # (model, job id) -> the job's event channel
        self.least = least
        self.most = most
        self.unclaimed_s = unclaimed_s
        self.idle_s = idle_s
        self.asked_at: dict[str, float] = {}  # model -> when an id was last asked for
        self.pools: dict[str, list[str]] = {}  # model -> ids whose channels are subscribed
        self.took: dict[str, int] = {}  # model -> ids asked for since the last refill
        self.demand: dict[str, float] = {}  # model -> ids asked for a tick, decaying
        self.taken: dict[str, float] = {}  # channel -> when its id was taken (monotonic)

    def take(self, model: str) -> str | None:
        """A spare id for a new job of ``model``, or None when there is none (the model gets
        spares from the next refill on, within ``MODELS``)."""
        now, pool = time.monotonic(), self.pools.get(model)
        if pool is None:
            if len(self.pools) < MODELS:
                self.pools[model], self.took[model], self.demand[model] = [], 1, 0.0
                self.asked_at[model] = now
            return None
        self.took[model] += 1
        self.asked_at[model] = now
        if not pool:
            return None
        job_id = pool.pop()
        self.taken[self.channel_of(model, job_id)] = now
        return job_id

    def claim(self, channel: str) -> bool:
        """True when ``channel`` is a taken spare's, subscribed already: now its listener's."""
        return self.taken.pop(channel, None) is not None

    def refill(self) -> tuple[dict[str, list[str]], list[str]]:
        """Per model, new ids to subscribe now (``add`` them once subscribed), and channels
        to leave: a model's spares beyond twice its target once its demand fell, and ids
        taken long ago and never listened to. A model's demand is the ids asked for in the
        last tick, or a fifth less than before when fewer were."""
        now = time.monotonic()
        leave = [c for c, at in self.taken.items() if now - at > self.unclaimed_s]
        for channel in leave:
            del self.taken[channel]
        for model in [m for m, at in self.asked_at.items() if now - at > self.idle_s]:
            leave += [self.channel_of(model, i) for i in self.pools.pop(model)]
            del self.took[model], self.demand[model], self.asked_at[model]
        new: dict[str, list[str]] = {}
        for model, pool in self.pools.items():
            demand = self.demand[model] = max(float(self.took[model]), self.demand[model] * 0.8)
            self.took[model] = 0
            target = min(self.most, max(self.least, math.ceil(2 * demand)))
            if len(pool) < target:
                new[model] = [uuid.uuid4().hex for _ in range(target - len(pool))]
            while len(pool) > 2 * target:
                leave.append(self.channel_of(model, pool.pop(0)))
        return new, leave

    def add(self, model: str, ids: list[str]) -> list[str]:
        """Ids whose channels were subscribed (a model retired meanwhile: left at once)."""
        pool = self.pools.get(model)
        if pool is not None:
            pool.extend(ids)
            return []
        return [self.channel_of(model, i) for i in ids]

    def drop(self, channels: Iterable[str]) -> list[str]:
        """Forget the spares among ``channels``, whose connection was lost: none may be taken
        before it is subscribed again. Returns their channels (to leave)."""
        lost, out = set(channels), []
        for model, pool in self.pools.items():
            named = [(i, self.channel_of(model, i)) for i in pool]
            pool[:] = [i for i, channel in named if channel not in lost]
            out += [channel for _, channel in named if channel in lost]
        return out
