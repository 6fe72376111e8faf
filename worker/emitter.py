"""Coalesces one job's events into batches and writes them, fenced, to Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Protocol

from redis.exceptions import RedisError

from shared.errors import LeaseLost
from shared.jobs import Claimed
from shared.models import (
    DoneEvent,
    ErrorEvent,
    Event,
    EventBatch,
    JobState,
    StartedEvent,
    TokenEvent,
    Usage,
)

OUTAGE_S = 30.0  # how long a job keeps retrying one write through a Redis outage


class EmitSink(Protocol):
    """Writes one job's batch, fenced: ``JobStore`` itself, or a worker's ``EmitBatcher``."""

    async def emit(
        self,
        claimed: Claimed,
        batch: EventBatch,
        *,
        new_tokens: int,
        terminal: JobState | None = None,
    ) -> bool: ...


class EventEmitter:
    """Numbers a job's events and writes them in batches at most every ``interval_s``.

    Every write is one Redis round trip and one wake-up of each reader, so writes are few:
    ``started`` waits up to ``interval_s`` for the first token and goes out with it; the first
    token goes out at once; later tokens that arrive while a batch is being written, or within
    ``interval_s`` of the previous write, ride in the next batch; the end takes whatever is
    still waiting into the terminal write. Order is preserved because one task writes at a
    time. A write the store refuses (the fence moved: lease lost, job cancelled; or the batch
    is not the job's next) raises ``LeaseLost``; a write the client replayed after a lost reply
    counts as written (``EMIT`` answers "already applied").
    """

    def __init__(
        self,
        sink: EmitSink,
        claimed: Claimed,
        interval_s: float,
        *,
        first_write: asyncio.Event | None = None,
    ) -> None:
        self.sink = sink  # where batches go: the store itself, or the worker's shared batcher
        self.first_write = first_write  # set as the first write goes out
        self.claimed = claimed
        self.interval_s = interval_s
        self.seq = claimed.seq
        self.pending: list[Event] = []
        self.pending_tokens = 0
        self.last_write = 0.0
        self.tokens_written = 0
        self._flusher: asyncio.Task[None] | None = None
        self._holding = False  # the writer task is waiting (not writing): safe to cancel
        self._closing = False  # the end is coming: the writer task stops after its write
        self._first_token = asyncio.Event()
        self._lock = asyncio.Lock()
        self._failure: BaseException | None = None

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    async def started(self, worker_id: str, prompt_tokens: int | None = None) -> None:
        # ``started`` takes no sequence number: SSE ids stay 1..N over tokens and the end
        event = StartedEvent(s=self.seq, worker=worker_id, prompt_tokens=prompt_tokens)
        self.pending.append(event)
        self._schedule()

    async def token(
        self,
        text: str,
        engine_tokens: int = 1,
        lp: list[dict[str, Any]] | None = None,
        tc: list[dict[str, Any]] | None = None,
    ) -> None:
        """Queue one token event; ``engine_tokens`` is how many engine tokens made its text
        (more than one when a stop-sequence prefix was held back), counted into ``ntok``;
        ``lp`` and ``tc`` are logprobs and tool-call deltas (feature requests only).

        Never waits for Redis: the generation loop keeps its pace while a writer task sends
        what has accumulated. A failed write (fenced off, Redis down) surfaces here next time.
        """
        if self._failure is not None:
            raise self._failure
        if lp is None and tc is None:
            self.pending.append(TokenEvent(s=self._next(), x=text))
        else:
            self.pending.append(TokenEvent(s=self._next(), x=text, lp=lp, tc=tc))
        self.pending_tokens += engine_tokens
        self._first_token.set()
        self._schedule()

    def _schedule(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        try:
            while self.pending and not self._closing:
                self._holding = True
                try:
                    await self._hold()
                finally:
                    self._holding = False
                await self.flush()
        except (LeaseLost, RedisError, OSError) as failure:
            self._failure = failure

    async def _hold(self) -> None:
        """Wait until the pending events are due: the first token is due at once."""
        if not self.tokens_written:
            if not self._first_token.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval_s):
                        await self._first_token.wait()
            return
        wait = self.last_write + self.interval_s - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _settle(self) -> None:
        """Stop the writer task (at once if it is only waiting; else after its write) and
        re-raise what it failed with; whatever it did not take is still in ``pending``."""
        self._closing = True
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            if self._holding:
                flusher.cancel()  # never cancelled inside a write: that would lose its batch
            await asyncio.wait([flusher])  # our own cancellation still propagates
        if self._failure is not None:
            raise self._failure

    async def flush(self, terminal: JobState | None = None) -> None:
        async with self._lock:
            if not self.pending:
                return
            batch, tokens = EventBatch(events=self.pending), self.pending_tokens
            self.pending, self.pending_tokens = [], 0
            self.last_write = time.monotonic()
            self.tokens_written += tokens
            if self.first_write is not None:
                # The worker's next pull waits on it and must not go out ahead of the first
                # token. Set from a callback: it runs before the sink's writer task
                # (``EmitBatcher``, started by ``_send`` below) takes its first step, but
                # ``Event.set`` wakes its waiters through the loop again, so they run after
                # that step has sent the batch. Set at once here, the pull loop's wake-up ran
                # first and the first token left ~25 µs later.
                asyncio.get_running_loop().call_soon(self.first_write.set)
                self.first_write = None  # once
            if not await self._send(batch, tokens, terminal):
                raise LeaseLost(self.claimed.job.id)

    async def _send(self, batch: EventBatch, tokens: int, terminal: JobState | None) -> bool:
        """Write one batch, riding out a Redis outage longer than the client's own retries
        for up to ``OUTAGE_S``. Safe because EMIT is safe to repeat: a batch that did land
        answers "already applied", and once the lease is lost (another worker took over after
        the outage) the write is fenced off. Past ``OUTAGE_S`` the error surfaces and the job
        fails over when its lease expires."""
        give_up, delay = time.monotonic() + OUTAGE_S, 0.05
        while True:
            try:
                return await self.sink.emit(
                    self.claimed, batch, new_tokens=tokens, terminal=terminal
                )
            except (RedisError, OSError):
                if time.monotonic() + delay > give_up:
                    raise
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)

    async def done(self, finish_reason: str, usage: Usage, **whole: Any) -> None:
        """The end; ``whole`` may carry the answer's ``tool_calls`` and ``logprobs``."""
        await self._settle()  # the end goes in the terminal write, with what is still pending
        done = DoneEvent(s=self._next(), finish_reason=finish_reason, usage=usage, **whole)
        self.pending.append(done)
        await self.flush(terminal=JobState.COMPLETED)

    async def error(self, code: str, message: str, status: int) -> None:
        await self._settle()
        self.pending.append(ErrorEvent(s=self._next(), code=code, message=message, status=status))
        await self.flush(terminal=JobState.FAILED)

    async def aclose(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
