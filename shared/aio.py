"""Task helpers every long-running loop shares."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Awaitable, Coroutine, Generator, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], timeout: float = 5.0) -> None:
    """Cancel ``tasks`` and wait until they are done, cancelling again if a cancel was lost.

    On Python 3.11 ``asyncio.wait_for`` (which redis-py uses around socket writes) can swallow
    a ``cancel()`` that lands as its inner future completes, so a loop that retries on errors
    may outlive a single cancel. Re-cancelling until the tasks finish, up to ``timeout``
    seconds, makes shutdown deterministic.
    """
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while pending and loop.time() < end:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    for task in pending:  # still running: leave it, but never hang the caller
        task.cancel()


def start_now(step: Awaitable[None]) -> asyncio.Future[None] | None:
    """Run ``step`` at once, in the caller's turn of the event loop, up to its first real wait.

    None when it finished without waiting (a socket write that went straight out); otherwise a
    task that finishes it. Like Python 3.12's eager task start, with one difference: the steps
    before the first wait run in the caller's task and context, not a new task's. So it is
    for coroutines that look at neither (ASGI ``send`` in uvicorn and Starlette: the gateway's
    inline relay writes a frame from the pub/sub reader with no task or loop turn per frame;
    only a write that has to wait, for a client that reads slowly, costs a task).
    """
    if not isinstance(step, types.CoroutineType):  # another kind of awaitable: the usual way
        return asyncio.ensure_future(step)
    coro = step
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    rest = asyncio.ensure_future(_Resumed(coro, waiting))
    rest.add_done_callback(lambda _: _abandon(coro, waiting))
    return rest


def _abandon(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    """Tidy up after the task. Usually nothing is left to do. But a task cancelled before its
    first step never ran ``coro`` on, nor took ``waiting`` (the future ``coro`` waits on):
    then ``coro`` is closed, so that its cleanup runs, and ``waiting`` loses the mark that
    says a task is about to wait on it, so that others may still await it."""
    if getattr(waiting, "_asyncio_future_blocking", False):
        waiting._asyncio_future_blocking = False
    coro.close()


class _Resumed:
    """Awaiting this continues a coroutine that already yielded ``waiting`` (what it waits
    on) to whoever drove it: ``yield from``, begun one step late. The task awaiting it sees
    the coroutine's waits, passes its cancellation on, and gets its result."""

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        self.coro = coro
        self.waiting = waiting

    def __await__(self) -> Generator[Any, Any, None]:
        waiting, self.waiting = self.waiting, None
        while True:
            try:
                sent = yield waiting
            except BaseException as exc:  # the task's cancellation, passed on
                try:
                    waiting = self.coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    waiting = self.coro.send(sent)
                except StopIteration:
                    return


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on uvloop where it is installed (it ships with
    ``uvicorn[standard]``; the gateway already runs on it), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(main)
    return uvloop.run(main)
