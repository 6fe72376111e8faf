"""``slipstream worker``: build the worker from settings and run it until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal

import structlog

from shared import aio
from shared.gc_policy import tune_gc
from shared.logs import configure_logging
from shared.redis import connect
from worker.engines import build_engine
from worker.service import Worker
from worker.settings import WorkerSettings


async def serve(settings: WorkerSettings) -> None:
    """Run one worker. The first SIGTERM/SIGINT drains; a second one cancels at once."""
    redis = connect(settings.redis_url, client_name="slipstream-worker")
    worker = Worker(settings, redis, build_engine(settings))
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def on_signal() -> None:
        if worker.stopping.is_set() and main_task is not None:
            main_task.cancel()
        worker.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await worker.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await redis.aclose()


def main(settings: WorkerSettings) -> None:
    configure_logging(settings.log_format, settings.log_level)
    structlog.get_logger("slipstream.worker").info(
        "worker_config", model=settings.model, engine=settings.engine
    )
    tune_gc(settings.gc_thresholds)
    aio.run(serve(settings))
