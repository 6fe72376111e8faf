"""Token-budget accounting: what a worker has in flight, and waiting for room."""

from __future__ import annotations

import asyncio
import contextlib


class Capacity:
    """A budget of tokens and sequences.

    The rule: a job fits when its cost is at most the free tokens and a sequence slot is free.
    A job larger than the whole budget is taken only when the worker is otherwise idle, so an
    oversized request is still served (alone) rather than starved.
    """

    def __init__(self, tokens: int, seqs: int) -> None:
        self.tokens = tokens
        self.seqs = seqs
        self.tokens_in_use = 0
        self.seqs_in_use = 0
        self._changed = asyncio.Event()

    @property
    def free_tokens(self) -> int:
        return max(0, self.tokens - self.tokens_in_use)

    @property
    def idle(self) -> bool:
        return self.seqs_in_use == 0

    @property
    def has_slot(self) -> bool:
        return self.seqs_in_use < self.seqs and (self.idle or self.free_tokens > 0)

    def reserve(self, cost: int) -> None:
        self.tokens_in_use += cost
        self.seqs_in_use += 1

    def release(self, cost: int) -> None:
        self.tokens_in_use -= cost
        self.seqs_in_use -= 1
        self._changed.set()

    def arm(self) -> None:
        """Forget earlier releases; call before looking at the queue, then ``wait_for_release``."""
        self._changed.clear()

    async def wait_for_release(self, timeout: float) -> None:
        """Return when capacity was released since ``arm``, or after ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)
