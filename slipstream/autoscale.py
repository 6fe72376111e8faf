"""``slipstream autoscale``: start and drain worker processes on one host as the backlog moves.

Every ``interval`` seconds the autoscaler reads the model's backlog (queued tokens and jobs,
consumer-group lag) and the live workers' capacity from Redis, asks ``scaling.decide`` what
to do, and applies it: new workers are started from the given command; surplus ones get
SIGTERM, which is a worker's graceful drain (it stops pulling and finishes what it holds).
A worker that exits on its own is forgotten and, if the fleet falls below ``--min``,
replaced. On SIGTERM/SIGINT the autoscaler drains all of its workers and exits.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field

import structlog
from redis.exceptions import RedisError, ResponseError

from shared.fleet import live_workers
from shared.jobs import read_backlog
from shared.keys import CONSUMER_GROUP, Keys
from shared.models import WorkerInfo
from shared.redis import RedisClient
from slipstream.scaling import Decision, Observation, ScalePolicy, ScaleState, decide

log = structlog.get_logger("slipstream.autoscale")
HISTORY = 10_000
QUICK_CRASH_S = 5.0
MAX_QUICK_CRASHES = 3


class WorkerCommandFailing(RuntimeError):
    """The worker command keeps exiting right after it starts (a crash loop)."""


@dataclass
class Child:
    popen: subprocess.Popen[bytes]
    started_s: float
    drain_deadline_s: float | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid


class WorkerProcesses:
    """The worker processes this autoscaler started: running, draining, reaped."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        drain_timeout_s: float = 120.0,
    ) -> None:
        if not command:
            raise ValueError("a worker command is required")
        self.command = list(command)
        self.env = dict(os.environ if env is None else env)
        self.drain_timeout_s = drain_timeout_s
        self.children: list[Child] = []

    @property
    def running(self) -> list[Child]:
        return [c for c in self.children if c.drain_deadline_s is None]

    @property
    def draining(self) -> list[Child]:
        return [c for c in self.children if c.drain_deadline_s is not None]

    def start(self, count: int) -> list[int]:
        started = []
        for _ in range(count):
            # own session: a Ctrl-C on the terminal reaches the autoscaler, which drains them
            try:
                popen = subprocess.Popen(self.command, env=self.env, start_new_session=True)
            except OSError as exc:  # not found, not executable: retrying will not help
                raise WorkerCommandFailing(f"cannot start {self.command[0]}: {exc}") from exc
            self.children.append(Child(popen, time.monotonic()))
            started.append(popen.pid)
        return started

    def drain(self, count: int, load: Mapping[int, int]) -> list[int]:
        """SIGTERM ``count`` running workers, least loaded first (``load``: pid -> tokens)."""
        newest_first = sorted(self.running, key=lambda c: -c.started_s)
        victims = sorted(newest_first, key=lambda c: load.get(c.pid, 0))[:count]
        for child in victims:
            child.drain_deadline_s = time.monotonic() + self.drain_timeout_s
            if child.popen.poll() is None:
                child.popen.send_signal(signal.SIGTERM)
        return [c.pid for c in victims]

    def reap(self) -> list[tuple[int, int, bool, float]]:
        """Forget exited workers; SIGKILL drains past their deadline.

        Returns ``(pid, exit code, was draining, seconds it ran)`` of each exited worker."""
        exited = []
        now = time.monotonic()
        for child in list(self.children):
            code = child.popen.poll()
            if code is None:
                if child.drain_deadline_s is not None and now > child.drain_deadline_s:
                    child.popen.kill()
                continue
            self.children.remove(child)
            drained = child.drain_deadline_s is not None
            exited.append((child.pid, code, drained, now - child.started_s))
        return exited

    async def stop_all(self, timeout_s: float) -> None:
        """Drain every worker, wait up to ``timeout_s``, then kill the stragglers."""
        self.drain(len(self.running), {})
        end = time.monotonic() + timeout_s
        while self.children and time.monotonic() < end:
            self.reap()
            await asyncio.sleep(0.05)
        for child in self.children:
            if child.popen.poll() is None:
                child.popen.kill()
            child.popen.wait()
        self.children.clear()


@dataclass(frozen=True, slots=True)
class Tick:
    """One autoscaler tick, as recorded in ``Autoscaler.history``."""

    t: float  # seconds since the autoscaler started
    running: int
    draining: int
    registered: int  # live workers of the model in the registry (any host)
    queued_tokens: int
    queued_jobs: int
    capacity_tokens: int
    tokens_in_use: int
    delta: int
    reason: str


async def queue_lag(redis: RedisClient, keys: Keys, model: str) -> int:
    """Entries not yet delivered to the consumer group, over the model's queues."""
    lag = 0
    for queue in keys.queues(model):
        try:
            groups = await redis.xinfo_groups(queue)
        except ResponseError:
            continue
        for group in groups:
            if group["name"] == CONSUMER_GROUP:
                lag += int(group.get("lag") or 0)
    return lag


async def observe(
    redis: RedisClient, keys: Keys, model: str, ttl_s: float
) -> tuple[Observation, list[WorkerInfo]]:
    backlog = await read_backlog(redis, keys, model)
    queued_tokens = max(0, sum(tokens for tokens, _ in backlog.values()))
    queued_jobs = max(0, sum(jobs for _, jobs in backlog.values()))
    lag = await queue_lag(redis, keys, model)
    workers = [w for w in await live_workers(redis, keys, ttl_s) if w.model == model]
    active = [w for w in workers if not w.draining]
    capacity = sum(w.capacity_tokens for w in active)
    obs = Observation(
        queued_tokens=queued_tokens,
        queued_jobs=max(queued_jobs, lag),
        capacity_tokens=capacity,
        tokens_in_use=sum(w.tokens_in_use for w in workers),
        per_worker_tokens=math.ceil(capacity / len(active)) if active else 0,
    )
    return obs, workers


@dataclass
class Autoscaler:
    policy: ScalePolicy
    procs: WorkerProcesses
    redis: RedisClient
    keys: Keys
    model: str
    ttl_s: float = 5.0
    interval_s: float = 2.0
    state: ScaleState = field(default_factory=ScaleState)
    history: deque[Tick] = field(default_factory=lambda: deque(maxlen=HISTORY))
    started_s: float = field(default_factory=time.monotonic)
    quick_crashes: int = 0

    async def tick(self) -> Tick:
        self._reap()
        obs, workers = await observe(self.redis, self.keys, self.model, self.ttl_s)
        now = time.monotonic()
        decision = decide(self.policy, self.state, obs, len(self.procs.running), now)
        self.state = decision.state
        self._apply(decision, workers)
        tick = Tick(
            t=round(now - self.started_s, 2),
            running=len(self.procs.running),
            draining=len(self.procs.draining),
            registered=len(workers),
            queued_tokens=obs.queued_tokens,
            queued_jobs=obs.queued_jobs,
            capacity_tokens=obs.capacity_tokens,
            tokens_in_use=obs.tokens_in_use,
            delta=decision.delta,
            reason=decision.reason,
        )
        self.history.append(tick)
        return tick

    def _reap(self) -> None:
        """Log exits; give up when the worker command keeps dying right after it starts."""
        for pid, code, drained, ran_s in self.procs.reap():
            if drained:
                log.info("worker_drained", pid=pid, exit_code=code)
                continue
            log.warning("worker_exited_unexpectedly", pid=pid, exit_code=code, ran_s=ran_s)
            self.quick_crashes = self.quick_crashes + 1 if ran_s < QUICK_CRASH_S else 0
            if self.quick_crashes >= MAX_QUICK_CRASHES:
                raise WorkerCommandFailing(
                    f"the worker command exited {self.quick_crashes} times in a row within "
                    f"{QUICK_CRASH_S:.0f} s of starting (last exit code {code})"
                )

    def _apply(self, decision: Decision, workers: list[WorkerInfo]) -> None:
        if decision.delta > 0:
            pids = self.procs.start(decision.delta)
            log.info("scale_up", started=pids, reason=decision.reason)
        elif decision.delta < 0:
            host = socket.gethostname()
            load = {w.pid: w.tokens_in_use for w in workers if w.host == host}
            pids = self.procs.drain(-decision.delta, load)
            log.info("scale_down", draining=pids, reason=decision.reason)

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop`` is set; then drain every worker this autoscaler started."""
        try:
            while not stop.is_set():
                try:
                    tick = await self.tick()
                    log.debug("autoscale_tick", **_as_dict(tick))
                except (RedisError, OSError) as exc:
                    log.warning("autoscale_observe_failed", error=str(exc))
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval_s)
        finally:
            await self.procs.stop_all(self.procs.drain_timeout_s)


def _as_dict(tick: Tick) -> dict[str, object]:
    return {name: getattr(tick, name) for name in Tick.__dataclass_fields__}


async def serve(
    policy: ScalePolicy,
    command: Sequence[str],
    *,
    model: str,
    interval_s: float,
    drain_timeout_s: float,
) -> None:
    """Run the autoscaler against ``REDIS_URL`` until SIGTERM/SIGINT."""
    from shared.logs import configure_logging
    from shared.redis import connect
    from shared.settings import CommonSettings

    settings = CommonSettings()
    configure_logging(settings.log_format, settings.log_level)
    redis = connect(settings.redis_url, client_name="slipstream-autoscale")
    procs = WorkerProcesses(command, drain_timeout_s=drain_timeout_s)
    scaler = Autoscaler(
        policy, procs, redis, Keys(settings.prefix), model, settings.worker_ttl_s, interval_s
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("autoscale_started", model=model, min=policy.min_workers, max=policy.max_workers)
    try:
        await scaler.run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await redis.aclose()
