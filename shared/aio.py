"""Task helpers every long-running loop shares."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
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


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on uvloop where it is installed (it ships with
    ``uvicorn[standard]``; the gateway already runs on it), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(main)
    return uvloop.run(main)
