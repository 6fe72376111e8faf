"""The load of ``bench.shard_ceiling``: one client process playing gateways and workers of one
model against one Redis, through the product's own code paths.

Gateway side (``subscribers``): each stream is a real ``Dispatch`` on a real
``PubSubMultiplexer`` (one pub/sub connection per process, as per gateway): subscribe, the
job-index ``SET`` and ``ENQUEUE`` in one pipeline, events from pub/sub (the log only when
``JobEvents`` needs it), a batched ``UNSUBSCRIBE``. Without subscribers, feeders only enqueue,
keeping at most ``streams`` jobs of this process in flight (nobody listens to the channels).

Worker side: ``SimWorker`` pulls like ``WorkerService._pull_once`` (``PULL``, and a blocking
``XREAD`` on the queue marks when nothing else waits), writes each job's batches through a
real ``EmitBatcher`` (one pipeline of ``EMIT`` calls for all its jobs' pending batches) and
heartbeats every second like ``heartbeat_once`` (``RENEW`` of its running jobs, the registry
entry, the advertisement). A job is ``tokens`` token events: the first batch is ``started``
with the first token (the emitter's first write), then ``batch_tokens`` per batch, the last
one carrying the ``done`` event (the terminal ``EMIT``). No engine: the batches go out as fast
as the client can send them, so the load generator, not a model, sets the pace.

The trade-off: generation is not paced, so a job lives milliseconds, not seconds; its Redis
work per job is the same (a real job only spreads it out), except ``RENEW``, which a long job
pays once per heartbeat: that is reported per worker-second, not per job.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from gateway.dispatch import Dispatch
from gateway.multiplexer import PubSubMultiplexer
from shared.affinity import AffinityPolicy
from shared.aio import cancel_and_wait
from shared.jobs import Claimed, JobStore, now_ms
from shared.keys import Keys
from shared.models import (
    DoneEvent,
    Event,
    EventBatch,
    Job,
    JobState,
    Priority,
    SamplingParams,
    StartedEvent,
    TokenEvent,
    Usage,
    WorkerInfo,
)
from shared.redis import connect
from worker.advertiser import Advertiser
from worker.emit_batcher import EmitBatcher
from worker.registry import Registry

MODEL = "shard-model"
KEYS = Keys()
LEASE_MS = 5000  # SLIPSTREAM_LEASE_S default
WORKER_TTL_MS = 5000
AGING = {Priority.NORMAL: 10_000, Priority.LOW: 30_000}  # worker defaults
TENANTS = 16  # jobs spread over tenants: none holds its fair share (8192 tokens) of the queue
WORD = " the"  # one token's text (~4 bytes, as a BPE token)
STREAM_LIMIT_S = 120.0  # a stream not finished by then is cancelled (counted as fenced off)
CAPACITY = 1 << 20  # a worker's token capacity: slots, not tokens, bound it here


@dataclass(frozen=True, slots=True)
class Spec:
    """What one load process runs (picklable: it crosses a ``spawn``)."""

    url: str
    tokens: int  # token events per job
    batch_tokens: int  # token events per EMIT batch (the emitter's coalescing)
    subscribers: bool  # gateways listen on the job channels (the product's normal case)
    streams: int  # concurrent gateway streams (or in-flight jobs) of this process
    workers: int  # simulated workers in this process
    slots: int  # sequences each worker runs at once
    prompt_bytes: int  # the prompt's size (the job payload ENQUEUE stores, PULL returns)
    ttl_s: int  # a finished job's keys live this long: short, so expiry runs in the window
    index: int  # this process's number


def batches_per_job(tokens: int, batch_tokens: int) -> int:
    """EMIT calls per job: ``started`` + the first token, then ``batch_tokens`` per batch, the
    last one with ``done`` (a one-token job still sends its ``done`` in a second batch)."""
    return 1 + max(1, math.ceil((tokens - 1) / batch_tokens))


def job_batches(claimed: Claimed, worker: str, tokens: int, per: int) -> list[list[Event]]:
    """The event batches of one job, in order, as ``EventEmitter`` would write them."""
    seq = claimed.seq
    prompt = claimed.job.prompt_tokens_estimate
    first: list[Event] = [StartedEvent(s=seq, worker=worker, prompt_tokens=prompt)]
    first.append(TokenEvent(s=seq + 1, x=WORD))
    out, sent = [first], 1
    while sent < tokens or len(out) == 1:
        n = min(per, tokens - sent)
        out.append([TokenEvent(s=seq + sent + i + 1, x=WORD) for i in range(n)])
        sent += n
    usage = Usage(prompt_tokens=prompt, completion_tokens=tokens)
    out[-1].append(DoneEvent(s=seq + tokens + 1, finish_reason="length", usage=usage))
    return out


def make_job(spec: Spec, n: int) -> Job:
    """A completion job as the gateway builds it (unique prompt: no warm worker for it)."""
    head = f"[{uuid.uuid4().hex}] "
    prompt = head + "x" * max(0, spec.prompt_bytes - len(head))
    return Job(
        id=uuid.uuid4().hex,
        model=MODEL,
        kind="completion",
        prompt=prompt,
        params=SamplingParams(max_tokens=spec.tokens, temperature=0.0),
        enqueued_at_ms=now_ms(),
        prompt_tokens_estimate=len(prompt) // 4,
        request_id=uuid.uuid4().hex,
        tenant=f"tenant-{n % TENANTS}",
    )


def store_for(redis: Any, ttl_s: int) -> JobStore:
    """A ``JobStore`` with the gateway's defaults: fair share 8192 tokens, affinity 250 ms."""
    policy = AffinityPolicy(250, 900_000)
    return JobStore(redis, KEYS, ttl_s=ttl_s, fair_share_tokens=8192, affinity=policy)


class Counters:
    """Shared counters (an ``mp.Array``): jobs finished, EMIT batches written, jobs in flight
    (feeders only), jobs fenced off (never expected)."""

    def __init__(self, array: Any) -> None:
        self.array = array

    def add(self, i: int, n: int = 1) -> None:
        with self.array.get_lock():
            self.array[i] += n

    def get(self, i: int) -> int:
        return int(self.array[i])


class SimWorker:
    """One worker of the model: pull, run jobs as batches of events, heartbeat."""

    def __init__(self, spec: Spec, n: int, counters: Counters, stop: asyncio.Event) -> None:
        self.spec = spec
        self.stop = stop
        self.id = f"sim-{spec.index}-{n}-{os.getpid()}"
        self.redis = connect(spec.url)
        self.store = store_for(self.redis, spec.ttl_s)
        self.batcher = EmitBatcher(self.store)
        self.counters = counters
        self.running: dict[str, Claimed] = {}
        self.used = 0
        self.freed = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        now = now_ms()
        info = WorkerInfo(
            id=self.id, host="bench", pid=os.getpid(), model=MODEL, engine="sim",
            capacity_tokens=CAPACITY, max_seqs=spec.slots, started_at_ms=now, heartbeat_at_ms=now,
        )  # fmt: skip
        self.registry = Registry(self.redis, KEYS, info)
        self.advertiser = Advertiser(self.redis, KEYS, MODEL, self.id, WORKER_TTL_MS)

    async def pull_loop(self) -> None:
        while not self.stop.is_set():
            free = self.spec.slots - len(self.running)
            if free <= 0:
                self.freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.freed.wait(), 1.0)
                continue
            result = await self.store.pull(
                MODEL, self.id, free_tokens=CAPACITY - self.used, free_seqs=free,
                idle=not self.running, lease_ms=LEASE_MS, aging_ms=AGING, max_deliveries=3,
                worker_ttl_ms=WORKER_TTL_MS,
            )  # fmt: skip
            if result.kind == "job" and result.claimed is not None:
                self._start(result.claimed)
            if result.last_ids:  # nothing (else) waits: block until something is queued
                block = 2000 if result.next_lease_ms < 0 else max(1, result.next_lease_ms + 5)
                names = [*KEYS.queues(MODEL), KEYS.wake(MODEL)]
                streams: Any = dict(zip(names, result.last_ids, strict=True))
                await self.redis.xread(streams, count=1, block=min(block, 2000))

    def _start(self, claimed: Claimed) -> None:
        self.running[claimed.job.id] = claimed
        self.used += claimed.job.cost_tokens
        task = asyncio.create_task(self._run(claimed))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, claimed: Claimed) -> None:
        batches = job_batches(claimed, self.id, self.spec.tokens, self.spec.batch_tokens)
        try:
            for i, events in enumerate(batches):
                last = i == len(batches) - 1
                new = sum(1 for e in events if e.t == "token")
                ok = await self.batcher.emit(
                    claimed, EventBatch(events=events), new_tokens=new,
                    terminal=JobState.COMPLETED if last else None,
                )  # fmt: skip
                self.counters.add(1)
                if not ok:  # fenced off: never expected here (leases outlive these jobs)
                    self.counters.add(3)
                    break
            else:
                self.counters.add(0)
        finally:
            del self.running[claimed.job.id]
            self.used -= claimed.job.cost_tokens
            if not self.spec.subscribers:
                self.counters.add(2, -1)
            self.freed.set()

    async def close(self) -> None:
        """After ``stop``: the running jobs finish (they write without pause), then close."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=10.0)
        await cancel_and_wait(list(self.tasks))
        await self.batcher.close()
        await self.redis.aclose()

    async def heartbeat_loop(self) -> None:
        """Every second, as ``WorkerService.heartbeat_once``: renew, registry, advertisement."""
        while not self.stop.is_set():
            leases = {jid: c.fence for jid, c in self.running.items()}
            await self.store.renew(MODEL, leases, LEASE_MS)
            await self.registry.beat(seqs_in_use=len(self.running))
            await self.advertiser.beat(
                CAPACITY - self.used, self.spec.slots - len(self.running), None
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 1.0)


async def stream_loop(
    spec: Spec, store: JobStore, mux: PubSubMultiplexer, n: int, stop: asyncio.Event
) -> None:
    """One gateway stream after another: a real ``Dispatch`` from open to its last event."""
    while not stop.is_set():
        job = make_job(spec, n)
        dispatch = Dispatch(
            store, mux, job, worker_wait_s=60.0, stall_timeout_s=60.0, worker_ttl_s=5.0
        )
        await dispatch.open()
        try:
            end = time.monotonic() + STREAM_LIMIT_S  # bounded (a job ends in under a second)
            while not dispatch.finished and time.monotonic() < end:
                await dispatch.next(timeout=5.0)
        finally:
            await dispatch.close()


async def feed_loop(
    spec: Spec, store: JobStore, counters: Counters, n: int, limit: int, stop: asyncio.Event
) -> None:
    """Enqueue only, keeping at most ``limit`` jobs in flight over every process."""
    while not stop.is_set():
        if counters.get(2) >= limit:
            await asyncio.sleep(0.002)
            continue
        counters.add(2)
        await store.enqueue(make_job(spec, n))


async def run_load(spec: Spec, array: Any, procs: int, stop: asyncio.Event | None = None) -> None:
    """The whole process's load, until ``stop`` is set (the gateways finish their streams,
    then the workers their jobs, then everything closes) or the process is terminated."""
    stop = stop or asyncio.Event()
    counters = Counters(array)
    workers_stop = asyncio.Event()
    workers = [SimWorker(spec, n, counters, workers_stop) for n in range(spec.workers)]
    for w in workers:  # advertised before any pull, as a starting worker is
        await w.advertiser.beat(CAPACITY, spec.slots, None)
    redis = connect(spec.url)
    store = store_for(redis, spec.ttl_s)
    back = [asyncio.create_task(w.pull_loop()) for w in workers]
    back += [asyncio.create_task(w.heartbeat_loop()) for w in workers]
    mux = PubSubMultiplexer(redis, queue_size=64)
    front: list[asyncio.Task[None]] = []
    try:
        if spec.subscribers:
            await mux.start()
            loops = [stream_loop(spec, store, mux, n, stop) for n in range(spec.streams)]
        else:
            limit, feeders = spec.streams * procs, max(1, spec.streams // 8)
            loops = [feed_loop(spec, store, counters, n, limit, stop) for n in range(feeders)]
        front = [asyncio.create_task(loop) for loop in loops]
        await asyncio.gather(*front)
        workers_stop.set()
        await asyncio.gather(*back)
    finally:  # a terminated process skips this
        await cancel_and_wait([*front, *back])
        await mux.close()
        for w in workers:
            await w.close()
        await redis.aclose()


def load_process(spec: Spec, array: Any, procs: int) -> None:
    """Entry point of one load process (``multiprocessing``, spawn)."""
    asyncio.run(run_load(spec, array, procs))
