"""The worker process: pull loop, job tasks, heartbeat, cancellations and graceful drain."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Awaitable
from contextlib import suppress
from typing import Any

import structlog
from redis.exceptions import NoScriptError, RedisError

from shared import scripts
from shared.aio import cancel_and_wait
from shared.capabilities import to_bits
from shared.job_records import PullOptions, PullResult, pull_result
from shared.jobs import Claimed, JobStore, now_ms
from shared.keys import Keys
from shared.models import Priority, WorkerInfo
from shared.pubsub import KEEPALIVE_S, ShardedSubscriber
from shared.redis import RedisClient
from worker.advertiser import Advertiser
from worker.capacity import Capacity
from worker.emit_batcher import EmitBatcher
from worker.engine import Engine
from worker.job_runner import Throughput, run_job
from worker.metrics import WorkerMetrics
from worker.registry import Registry, default_worker_id
from worker.settings import WorkerSettings

log = structlog.get_logger("slipstream.worker")


class Worker:
    """Pulls a model's jobs while it has capacity; each job runs as its own task."""

    def __init__(self, settings: WorkerSettings, redis: RedisClient, engine: Engine) -> None:
        self.settings = settings
        self.redis = redis
        self.engine = engine
        self.keys = Keys(settings.prefix)
        self.store = JobStore(
            redis,
            self.keys,
            ttl_s=settings.job_log_ttl_s,
            min_replicas=settings.redis_min_replicas,  # WAIT after a job's end
            replica_wait_ms=settings.redis_replica_wait_ms,
        )
        self.emits = EmitBatcher(self.store)  # all jobs' event batches share round trips
        tokens, seqs = engine.capacity() or (settings.capacity_tokens, settings.max_seqs)
        self.capacity = Capacity(tokens, seqs)
        self.throughput = Throughput()
        self.id = settings.worker_id or default_worker_id()
        self.running: dict[str, tuple[asyncio.Task[object], Claimed]] = {}
        self.stopping = asyncio.Event()
        self._stopper: asyncio.Task[bool] | None = None  # see ``_stop_waiter``
        self._pull_id: str | None = None  # the id of a pull not answered yet (``_pull_once``)
        self._answered: PullResult | None = None  # the PULL sent with a wait (``_wait_for_work``)
        self.caps = to_bits(engine.capabilities)  # what PULL lets this worker take
        self.registry = Registry(redis, self.keys, self._info())
        self.advertiser = Advertiser(
            redis, self.keys, settings.model, self.id, int(settings.worker_ttl_s * 1000), self.caps
        )
        self.metrics = WorkerMetrics.for_worker(self)
        self.aging_ms = {
            Priority.NORMAL: int(settings.aging_normal_s * 1000),
            Priority.LOW: int(settings.aging_low_s * 1000),
        }

    def _info(self) -> WorkerInfo:
        s = self.settings
        return WorkerInfo(
            id=self.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            model=s.model,
            engine=self.engine.name,
            capacity_tokens=self.capacity.tokens,
            max_seqs=self.capacity.seqs,
            started_at_ms=now_ms(),
            heartbeat_at_ms=now_ms(),
            metrics_port=s.metrics_port,
            context_tokens=s.context_tokens or (s.n_ctx if s.engine == "llama" else 0),
            capabilities=sorted(f.value for f in self.engine.capabilities),
        )

    # --- lifecycle ----------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until ``stop()``; then drain within the grace period and leave the registry."""
        await self.engine.start()
        await self.heartbeat_once()
        log.info("worker_started", worker_id=self.id, model=self.settings.model)
        helpers = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._control_loop(), name="control"),
            asyncio.create_task(self.advertiser.run(self.engine.warm()), name="advertiser"),
        ]
        try:
            await self.metrics.start_server(self.settings.metrics_port, self.settings.metrics_host)
            await self._pull_loop()
            await self._settle_last_pull()
            await self._drain()
        finally:
            await cancel_and_wait([*helpers, *([self._stopper] if self._stopper else [])])
            with suppress(RedisError, OSError):
                await self.store.release(self.settings.model, self.id)
            with suppress(RedisError, OSError):
                await self.registry.leave()
            await self.emits.close()
            await self.engine.close()
            await self.metrics.stop_server()
            log.info("worker_stopped", worker_id=self.id)

    def stop(self) -> None:
        """Stop pulling; ``run`` then drains in-flight jobs."""
        self.stopping.set()

    async def _drain(self) -> None:
        tasks = [t for t, _ in self.running.values()]
        if not tasks:
            return
        log.info("worker_draining", in_flight=len(tasks), grace_s=self.settings.drain_grace_s)
        with suppress(RedisError, OSError):
            await self.heartbeat_once(draining=True)
        with suppress(RedisError, OSError):  # what waits for us warm goes to others now
            await self.store.release(self.settings.model, self.id)
        _, late = await asyncio.wait(tasks, timeout=self.settings.drain_grace_s)
        left = [claimed for task, claimed in list(self.running.values()) if task in late]
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        for claimed in left:  # nobody waits for our lease to expire
            with suppress(RedisError, OSError):
                handed = await self.store.handback(claimed)
                log.info("job_handed_back", job_id=claimed.job.id, handed_back=handed)

    async def _settle_last_pull(self) -> None:
        """Hand back what the last PULL claimed and nothing here will run: its answer, or the
        claim Redis made for a PULL whose answer never came (queued behind a read that the
        stop cancelled, or lost with a connection). Asked again under the same id, with no
        capacity to take anything new, PULL returns that claim if there was one. Without
        this the job would wait out its lease."""
        result, self._answered = self._answered, None
        with suppress(RedisError, OSError):
            if result is None and self._pull_id is not None:
                options = self._pull_args()
                options["free_tokens"], options["free_seqs"], options["idle"] = 0, 0, False
                result = await self.store.pull(self.settings.model, self.id, **options)
            if result is not None and result.claimed is not None:
                handed = await self.store.handback(result.claimed)
                log.info("job_handed_back", job_id=result.claimed.job.id, handed_back=handed)

    # --- pulling ------------------------------------------------------------------------
    async def _pull_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                await self._pull_once()
            except (RedisError, OSError) as exc:
                log.warning("pull_failed", error=str(exc))
                await self._sleep_unless_stopping(0.5)

    async def _pull_once(self) -> None:
        cap = self.capacity
        cap.arm()
        result = await self._answer_of_wait()
        if result is None:  # no (usable) answer from the PULL sent with the last wait
            if not self._has_room():
                await cap.wait_for_release(1.0)
                return
            result = await self.store.pull(self.settings.model, self.id, **self._pull_args())
            self._pull_id = None  # answered: the next pull is a new one
        if result.kind == "job" and result.claimed is not None:
            self.metrics.job_claimed(result.outcome, result.affinity_wait_ms)
            began = self._start(result.claimed)
            if not result.last_ids:
                await asyncio.sleep(0)  # more is waiting: pull again once the job has begun
                return
            # Nothing else is waiting: let the job's first write (its first token) go out
            # before ours, which only blocks until something is queued.
            with suppress(TimeoutError):
                async with asyncio.timeout(self.settings.coalesce_ms / 1000):
                    await began.wait()
        elif result.kind == "full":
            await cap.wait_for_release(1.0)
        if result.last_ids:  # nothing (else) is waiting: block until something is queued
            block = self.settings.block_ms
            if result.next_lease_ms >= 0:  # wake when the next lease could expire
                block = max(1, min(block, result.next_lease_ms + 5))
            await self._wait_for_work(result.last_ids, block)

    async def _answer_of_wait(self) -> PullResult | None:
        """The answer of the PULL queued behind the last wait's read, if it can be used now.
        Not a ``full``: it was reckoned with the capacity the wait began with, and jobs may
        have ended since (pull again now). Not a job when the engine stopped being able to
        take one meanwhile (unhealthy, a busy upstream): that claim is handed back."""
        result, self._answered = self._answered, None
        if result is None or result.kind == "full":
            return None
        if result.claimed is not None and not self._has_room():
            handed = await self.store.handback(result.claimed)
            log.info("job_handed_back", job_id=result.claimed.job.id, handed_back=handed)
            return None
        return result

    def _has_room(self) -> bool:
        """May this worker take a job now (a free slot, a healthy engine with room)?"""
        return self.capacity.has_slot and self.engine.healthy() and self.engine.has_room()

    def _pull_args(self) -> PullOptions:
        """``PULL``'s arguments now. A pull whose answer never came (Redis failing over, past
        the client's own retries) may have claimed a job: the next pull repeats its id, so
        PULL hands that claim back instead of leaving the job to run out its lease unheard
        (``shared/lua/pull.lua``)."""
        cap = self.capacity
        self._pull_id = self._pull_id or uuid.uuid4().hex
        return PullOptions(
            free_tokens=cap.free_tokens,
            free_seqs=cap.seqs - cap.seqs_in_use,
            idle=cap.idle,
            lease_ms=int(self.settings.lease_s * 1000),
            aging_ms=self.aging_ms,
            max_deliveries=self.settings.max_deliveries,
            worker_ttl_ms=int(self.settings.worker_ttl_s * 1000),
            caps=self.caps,
            pull_id=self._pull_id,
        )

    async def _read_then_pull(self, streams: Any, block_ms: int) -> None:
        """The blocking read with the next ``PULL`` queued behind it on one connection: Redis
        runs the PULL as soon as the read returns, before this process has even woken, and
        both answers come back together (a job queued for an idle worker costs one round trip
        to reach it, not two). Only for a worker with room for a job: the PULL declares the
        tokens and slots it has free as it starts to wait, and only its own claims use them up
        (the jobs it runs meanwhile may only free more; the llama engine reserves a job's
        cells when it admits it). What an engine cannot promise, a busy upstream's room, may
        change while it waits, as between any check and claim. Its answer is
        ``_pull_once``'s next."""
        named = self.store.pull_args(self.settings.model, self.id, **self._pull_args())
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xread(streams, count=1, block=block_ms)
            scripts.PULL.queue(pipe, **named)
            _, reply = await pipe.execute(raise_on_error=False)
        if isinstance(reply, NoScriptError):
            await scripts.PULL.load(self.redis)  # the next pull, a plain one, runs it
        elif not isinstance(reply, Exception):
            self._answered = pull_result(reply)
            self._pull_id = None

    async def _wait_for_work(self, last_ids: tuple[str, ...], block_ms: int) -> None:
        """Block (no polling) until a job is queued or handed back, or ``block_ms`` passes."""
        names = [*self.keys.queues(self.settings.model), self.keys.wake(self.settings.model)]
        streams: Any = dict(zip(names, last_ids, strict=True))
        read: Awaitable[Any]
        if self._has_room():  # the PULL queued behind the read may claim a job
            read = self._read_then_pull(streams, block_ms)
        else:
            read = self.redis.xread(streams, count=1, block=block_ms)
        waiter: asyncio.Future[Any] = asyncio.ensure_future(read)
        done, _ = await asyncio.wait(
            {waiter, self._stop_waiter()}, return_when=asyncio.FIRST_COMPLETED
        )
        if waiter not in done:
            await cancel_and_wait([waiter])
        elif not waiter.cancelled():
            waiter.exception()  # retrieved: a failed read is retried by the next pull

    def _stop_waiter(self) -> asyncio.Task[bool]:
        """One task waiting for ``stopping``, shared by every wait for work. A task of its own
        per wait, cancelled and awaited before the next PULL could go out, cost a turn of the
        event loop on every first token's path."""
        if self._stopper is None:
            self._stopper = asyncio.ensure_future(self.stopping.wait())
        return self._stopper

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    def _start(self, claimed: Claimed) -> asyncio.Event:
        """Run the job in its own task; returns the event set as its first write goes out."""
        cost = claimed.job.cost_tokens
        self.capacity.reserve(cost)
        began = asyncio.Event()
        task = asyncio.create_task(self._run(claimed, began), name=f"job-{claimed.job.id}")
        self.running[claimed.job.id] = (task, claimed)
        return began

    async def _run(self, claimed: Claimed, began: asyncio.Event) -> object:
        outcome, prompt_tokens, cached_tokens = "crashed", 0, 0
        try:
            result = await run_job(
                store=self.store,
                engine=self.engine,
                claimed=claimed,
                worker_id=self.id,
                coalesce_s=self.settings.coalesce_ms / 1000,
                throughput=self.throughput,
                first_write=began,
                sink=self.emits,
            )
            outcome = result.state
            prompt_tokens, cached_tokens = result.prompt_tokens, result.cached_tokens
            return result
        except asyncio.CancelledError:
            outcome = "cancelled"
            log.info("job_cancelled", job_id=claimed.job.id)
            return None
        except Exception:
            log.exception("job_crashed", job_id=claimed.job.id)
            return None
        finally:
            self.metrics.job_ended(outcome, prompt_tokens, cached_tokens)
            if (entry := self.running.get(claimed.job.id)) is not None and entry[1] is claimed:
                del self.running[claimed.job.id]  # not a newer claim of the same job (takeover)
            self.capacity.release(claimed.job.cost_tokens)
            self.advertiser.changed.set()  # the engine may hold this job's prefix now

    # --- heartbeat and control ----------------------------------------------------------
    async def heartbeat_once(self, **changes: object) -> None:
        """Renew this worker's leases, then advertise it (registry, capacity, warm state)."""
        await self.renew_leases()
        await self.advertise(**changes)

    async def renew_leases(self) -> None:
        leases = {jid: c.fence for jid, (_, c) in self.running.items()}
        lease_ms = int(self.settings.lease_s * 1000)
        held = await self.store.renew(self.settings.model, leases, lease_ms)
        for job_id, ours in held.items():
            if not ours and job_id in self.running:
                self.running[job_id][0].cancel()

    async def advertise(self, **changes: object) -> None:
        fields: dict[str, object] = {
            "tokens_in_use": self.capacity.tokens_in_use,
            "seqs_in_use": self.capacity.seqs_in_use,
            "tokens_per_s": round(self.throughput.rate(), 3),
            "drain_tokens_per_s": round(self.throughput.drain_rate(), 3),
            "seq_tokens_per_s": round(self.throughput.seq_rate, 3),
            "healthy": self.engine.healthy(),
            "draining": self.stopping.is_set(),
        }
        await self.registry.beat(**{**fields, **changes})
        if not self.stopping.is_set():
            cap = self.capacity
            free_seqs = cap.seqs - cap.seqs_in_use
            await self.advertiser.beat(cap.free_tokens, free_seqs, self.engine.warm())

    async def _heartbeat_loop(self) -> None:
        """Leases on time, the advertisement beside them: the registry's keys are global (in
        Redis Cluster, on another shard than the model's, which may be failing over), and a
        slow or failing registry write must not delay the next lease renewal past the lease."""
        advertising: asyncio.Task[None] | None = None
        try:
            while True:
                await asyncio.sleep(self.settings.heartbeat_s)
                try:
                    await self.renew_leases()
                except (RedisError, OSError) as exc:
                    log.warning("heartbeat_failed", error=str(exc), part="leases")
                if advertising is None or advertising.done():
                    advertising = asyncio.create_task(self._advertise_logged())
        finally:
            if advertising is not None:
                await cancel_and_wait([advertising])

    async def _advertise_logged(self) -> None:
        try:
            await self.advertise()
        except (RedisError, OSError) as exc:
            log.warning("heartbeat_failed", error=str(exc), part="registry")

    async def _control_loop(self) -> None:
        """Cancel running jobs the gateway cancelled (``cancel <job id>`` messages on the
        model's sharded control channel; the subscriber resubscribes a lost connection, in
        the background when even the first subscription fails)."""
        subscriber = ShardedSubscriber(self.redis, self._on_control, lambda _channels: None)
        try:
            with suppress(RedisError, OSError):
                await subscriber.subscribe(self.keys.control_channel(self.settings.model))
            while True:
                await asyncio.sleep(KEEPALIVE_S)
                await subscriber.keepalive()
        finally:
            await subscriber.close()

    def _on_control(self, _channel: str, message: str) -> None:
        verb, _, job_id = message.partition(" ")
        if verb == "cancel" and job_id in self.running:
            self.running[job_id][0].cancel()
