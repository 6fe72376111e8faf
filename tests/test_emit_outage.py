"""A job rides out a Redis outage longer than the client's own retries: its emitter retries
the write (EMIT is safe to repeat) instead of crashing the job task."""

from __future__ import annotations

import asyncio
import contextlib

from redis.asyncio import Redis

from shared.jobs import JobStore
from shared.keys import Keys
from shared.models import TokenEvent, Usage
from shared.redis import connect
from tests.helpers import RedisProcess, make_job
from worker.emitter import EventEmitter


class Outage:
    """A TCP proxy to redis-server that can go down: ``down()`` cuts every connection and
    refuses new ones until ``up()``."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.is_down = False
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    def down(self) -> None:
        self.is_down = True
        for writer in list(self.writers):
            writer.close()

    def up(self) -> None:
        self.is_down = False

    async def close(self) -> None:
        self.down()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_down:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}


async def test_a_job_rides_out_a_redis_outage(redis: Redis, redis_server: RedisProcess) -> None:
    outage = Outage(int(redis_server.url.rsplit(":", 1)[1].split("/")[0]))
    proxied = connect(await outage.start())
    store = JobStore(proxied, Keys(), ttl_s=600)
    job = make_job()
    await store.enqueue(job)
    pull = {"free_tokens": 10_000, "idle": True, "aging_ms": {}, "max_deliveries": 3}
    taken = await store.pull(job.model, "w1", lease_ms=60_000, **pull)  # type: ignore[arg-type]
    assert taken.claimed is not None
    emitter = EventEmitter(store, taken.claimed, interval_s=0.0)
    try:
        await emitter.started("w1")
        await emitter.token("a")
        await asyncio.sleep(0.1)
        outage.down()  # 8 s: longer than redis-py's own retries (6, jittered backoff)
        await emitter.token("b")
        await asyncio.sleep(8.0)
        outage.up()
        await emitter.token("c")
        await asyncio.wait_for(
            emitter.done("stop", Usage(prompt_tokens=2, completion_tokens=3)), 30
        )
    finally:
        await emitter.aclose()
        await proxied.aclose()
        await outage.close()
    plain = JobStore(redis, Keys(), ttl_s=600)
    tokens = [
        e.x
        for entry in await plain.read_log(job.model, job.id)
        for e in entry.batch.events
        if isinstance(e, TokenEvent)
    ]
    assert tokens == ["a", "b", "c"]  # each once, in order
    assert await plain.job_state(job.model, job.id) == "completed"
