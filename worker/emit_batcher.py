"""``EmitBatcher``: one writer for all of a worker's jobs, so many concurrent sequences share
Redis round trips instead of paying one each.

A job's emitter hands its batch over and waits for the outcome. When no write is in flight
the batch goes out at once (one job alone loses no time); batches handed over while a write
is in flight go together in the next pipeline. The batching adapts to load by itself: the
more sequences a worker runs, the more each round trip carries. Every job has at most one
batch in flight (its emitter writes one at a time), so per-job order is kept.

A job cancelled while it waits does not withdraw its batch: it is written anyway, so the log
never has a hole that no reader could fill.
"""

from __future__ import annotations

import asyncio

from shared.aio import cancel_and_wait
from shared.jobs import Claimed, Emit, JobStore
from shared.models import EventBatch, JobState


class EmitBatcher:
    def __init__(self, store: JobStore, *, max_batch: int = 256) -> None:
        self.store = store
        self.max_batch = max_batch
        self.waiting: list[tuple[Emit, asyncio.Future[bool]]] = []
        self.writer: asyncio.Task[None] | None = None
        self.round_trips = 0  # pipelines sent (for tests and profiling)

    async def emit(
        self,
        claimed: Claimed,
        batch: EventBatch,
        *,
        new_tokens: int,
        terminal: JobState | None = None,
    ) -> bool:
        """Like ``JobStore.emit``: True once logged and published (also when Redis answers
        that a replay of this write found it applied already), False when fenced off."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.waiting.append((Emit(claimed, batch, new_tokens, terminal), done))
        if self.writer is None or self.writer.done():
            self.writer = asyncio.create_task(self._write_loop(), name="emit-batcher")
        return await done

    async def _write_loop(self) -> None:
        while self.waiting:
            taken = self.waiting[: self.max_batch]
            del self.waiting[: self.max_batch]
            try:
                results = await self.store.emit_many([emit for emit, _ in taken])
            except Exception as exc:
                # a Redis error, or any other a client library raises: these writes fail (their
                # callers retry Redis errors); a writer that died instead would leave every
                # later write waiting forever
                for _, done in taken:
                    if not done.done():
                        done.set_exception(exc)
                continue
            finally:
                self.round_trips += 1
            for (_, done), result in zip(taken, results, strict=True):
                if done.done():
                    continue
                if isinstance(result, Exception):
                    done.set_exception(result)
                else:
                    done.set_result(result)

    async def close(self) -> None:
        if self.writer is not None:
            await cancel_and_wait([self.writer])
