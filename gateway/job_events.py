"""A job's events in order, exactly once: pub/sub fast path, event log for repair.

``JobEvents`` subscribes before anything can be published, reads the log for whatever came
before (or was missed), then takes events from the pub/sub listener. It drops events whose
sequence number it has already passed on, and falls back to the log whenever it sees a gap, the
listener lagged, or nothing arrived for a while.

Trust: a pub/sub batch is taken only when it carries the fence of the job's current claim, as
known from the job's state (read with the log; a job this gateway just queued has had no claim
yet, so its first claim's fence is 1). Anything else, a stale worker's batch, a forged one, a
new claim's first batch or the gateway's own cancellation (which carries no fence), sends the
reader to the log, which only ``EMIT`` (fence-checked) and ``CANCEL`` append to. So a process
that can publish on the channel but does not hold the claim cannot splice text into a stream
(docs/security.md, "Trust model").
"""

from __future__ import annotations

import math
import time
from types import TracebackType
from typing import cast

from pydantic import ValidationError

from gateway.multiplexer import Listener, PubSubMultiplexer
from shared.jobs import JobStore
from shared.models import (
    TERMINAL_EVENT_TYPES,
    ErrorEvent,
    Event,
    EventBatch,
    JobState,
    TokenEvent,
)

LOG_GONE = "job_log_unavailable"  # the log expired or lost a batch: a 410, never a hang


class JobEvents:
    LOG_PAGE = 16  # log entries per read: bounds what one stream holds in memory at once

    __slots__ = (
        "fence",
        "finished",
        "gone",
        "job_id",
        "last_event_at",
        "last_log_read",
        "listener",
        "log_pos",
        "model",
        "mux",
        "needs_log",
        "poll_s",
        "seq",
        "store",
    )

    def __init__(
        self,
        store: JobStore,
        mux: PubSubMultiplexer,
        model: str,
        job_id: str,
        *,
        after_seq: int = 0,
        poll_s: float = 5.0,
        fresh: bool = False,
    ) -> None:
        self.store = store
        self.mux = mux
        self.model = model
        self.job_id = job_id
        self.seq = after_seq
        self.poll_s = poll_s
        self.log_pos = "-"
        self.finished = False
        self.gone = False  # the last log read found no such job: Redis lost or expired it
        self.listener: Listener | None = None
        # A job this gateway is about to submit has an empty log, and the subscription is
        # sent before the job is queued, so no event can precede it: skip the first read.
        self.needs_log = not fresh
        self.fence = 1 if fresh else 0  # the claim whose pub/sub batches are taken
        self.last_event_at = time.monotonic()
        self.last_log_read = 0.0

    async def __aenter__(self) -> JobEvents:
        channel = self.store.keys.job_channel(self.model, self.job_id)
        self.listener = await self.mux.subscribe(channel)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.listener is not None:
            await self.mux.unsubscribe(self.listener)
            self.listener = None

    async def next(self, timeout: float) -> list[Event]:
        """New events in order (empty after ``timeout`` seconds without any)."""
        return await self.next_until(time.monotonic() + timeout)

    async def next_until(
        self, end: float, *, slide: float = 0.0, hard: float = math.inf
    ) -> list[Event]:
        """New events in order (empty at ``end``, monotonic seconds, without any). ``slide``
        and ``hard``: ``end`` moves with events the inline relay takes (``Listener``)."""
        assert self.listener is not None
        while True:
            if self.needs_log or self.listener.lagging:
                events = await self._from_log()
                if self.gone and not events:
                    return []  # Redis lost the job: its dispatch acts on that now
            else:
                events = self._from_queue()
            now = time.monotonic()
            if events:
                self.last_event_at = now
                return events
            if now >= end:
                return []
            if self.needs_log:
                continue  # the queue showed a gap or another claim's batch: repair now
            # quiet for ``poll_s``: make sure nothing was missed (pub/sub only loses messages
            # on a disconnect, which marks the listener anyway; this is the belt to it). Events
            # the inline relay took meanwhile count: they move the belt's time on.
            slid = min(slide, self.poll_s) if slide else 0.0  # the belt slides too
            if not await self.listener.wait_until(min(end, self._belt_at()), slide=slid, hard=hard):
                self.needs_log = time.monotonic() >= self._belt_at()

    def _belt_at(self) -> float:
        return max(self.last_event_at, self.last_log_read) + self.poll_s

    def inline_events(self, raw: str, *, most: int) -> list[TokenEvent] | None:
        """``raw``'s events when it is a batch of at most ``most`` plain tokens from the
        current claim that follows on at once from this reader's position (the inline relay
        may render them); None for anything else. Changes nothing: ``advance`` takes them."""
        if self.needs_log:
            return None
        try:
            batch = EventBatch.model_validate_json(raw)
        except ValidationError:
            return None
        events = batch.events
        if batch.f != self.fence or not events or len(events) > most:
            return None
        for i, event in enumerate(events, start=self.seq + 1):
            if not isinstance(event, TokenEvent) or event.s != i:
                return None
        return cast(list[TokenEvent], events)  # every one checked above

    def advance(self, events: list[TokenEvent]) -> None:
        """``events`` (from ``inline_events``) went out: this reader is past them."""
        self.seq = events[-1].s
        self.last_event_at = time.monotonic()

    def _from_queue(self) -> list[Event]:
        assert self.listener is not None
        out: list[Event] = []
        for raw in self.listener.take():
            try:
                batch = EventBatch.model_validate_json(raw)
            except ValidationError:
                self.needs_log = True
                continue
            if batch.f != self.fence:  # not the current claim's (or one we have not seen yet)
                self.needs_log = True
                return out
            last = batch.events[-1] if batch.events else None  # a terminal event ends its batch
            if last is not None and last.t in TERMINAL_EVENT_TYPES and last.s <= self.seq:
                self.needs_log = True  # it ended before our position: the log ends it again
                return out
            fresh = [e for e in batch.events if e.s > self.seq or e.t == "started"]
            numbered = [e for e in fresh if e.t != "started"]
            if numbered and numbered[0].s != self.seq + 1:
                self.needs_log = True  # a gap: the log has what is missing
                return out
            out.extend(self._accept(fresh))
        return out

    async def _from_log(self) -> list[Event]:
        assert self.listener is not None
        self.needs_log = False
        self.last_log_read = time.monotonic()
        self.listener.lagging = False
        self.listener.take()  # the log covers whatever is queued
        # The state first: a terminal state means the log (appended in the same script)
        # already holds the terminal event, so a read that does not find it proves a loss.
        state, fence, entries = await self.store.state_and_log(
            self.model, self.job_id, after=self.log_pos, count=self.LOG_PAGE
        )
        self.gone = state is None
        # a queued job's next writer is its next claim
        self.fence = fence + 1 if state == JobState.QUEUED else fence
        out: list[Event] = []
        for entry in entries:
            self.log_pos = entry.stream_id
            fresh = [e for e in entry.batch.events if e.s > self.seq or e.t == "started"]
            out.extend(self._accept(fresh))
            if self.needs_log:  # a gap in the log itself: that batch is gone for good
                return [*out, self._log_gone("misses events")]
            out.extend(self._ended_before(entry.batch.events))
            if self.finished:
                return out
        if len(entries) == self.LOG_PAGE:
            self.needs_log = True  # more to read: next call, after the caller sent these
        elif state is not None and JobState(state).terminal:
            out.append(self._log_gone("has expired"))  # read to its end: the end is not there
        return out

    def _ended_before(self, events: list[Event]) -> list[Event]:
        """The terminal event when the job ended at or before this reader's position (a
        client resuming with the final event id, or past it): it ends the stream again."""
        for event in events:
            if event.t in TERMINAL_EVENT_TYPES and event.s <= self.seq and not self.finished:
                self.finished = True
                return [event]
        return []

    def _log_gone(self, why: str) -> ErrorEvent:
        self.finished = True
        message = f"the job's event log {why}; its output can no longer be streamed"
        return ErrorEvent(s=self.seq, code=LOG_GONE, message=message, status=410)

    def _accept(self, events: list[Event]) -> list[Event]:
        accepted: list[Event] = []
        for event in events:
            if event.t == "started":
                if event.s >= self.seq:  # not one the log replays from before our position
                    accepted.append(event)
                continue
            if event.s != self.seq + 1:
                self.needs_log = True
                break
            self.seq = event.s
            accepted.append(event)
            if event.t in TERMINAL_EVENT_TYPES:
                self.finished = True
                break
        return accepted
