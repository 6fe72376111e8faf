"""Runs one claimed job: engine tokens -> stop sequences -> coalesced, fenced events."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import structlog

from shared.errors import LeaseLost
from shared.jobs import Claimed, JobStore
from shared.models import TokenEvent, Usage
from worker.emitter import EmitSink, EventEmitter
from worker.engine import Engine, EngineError, GenerationRequest
from worker.features import Extras, continuation_error
from worker.stops import StopMatcher

log = structlog.get_logger("slipstream.worker")


@dataclass(slots=True)
class Window:
    """Counts over a sliding window of ``window_s`` (a young worker: over its age), kept in
    ``bucket_s`` buckets with a running total. One entry per token, summed at every
    heartbeat, held 100,000 entries at 10,000 tokens/s and took 6 % of a worker's CPU."""

    window_s: float = 10.0
    bucket_s: float = 0.1
    buckets: deque[list[float]] = field(default_factory=deque)  # [bucket start, count]
    total: float = 0.0
    born: float = field(default_factory=time.monotonic)

    def add(self, n: int) -> None:
        now = time.monotonic()
        if self.buckets and now - self.buckets[-1][0] < self.bucket_s:
            self.buckets[-1][1] += n
        else:
            self.buckets.append([now, float(n)])
        self.total += n

    def rate(self) -> float:
        now = time.monotonic()
        cutoff = now - self.window_s
        while self.buckets and self.buckets[0][0] < cutoff:
            self.total -= self.buckets.popleft()[1]
        return self.total / min(self.window_s, max(1.0, now - self.born))


@dataclass(slots=True)
class Throughput:
    """Tokens generated per second (the registry's ``tokens_per_s``), the backlog drained per
    second (``drain_tokens_per_s``), and the speed of one sequence (``seq_tokens_per_s``: a
    moving average over finished sequences).

    The backlog counts a job as its prompt estimate + ``max_tokens`` (``Job.cost_tokens``),
    and admission divides the queued backlog by a rate: that rate must be in the same unit.
    Generated tokens are not: a long prompt is read far faster than tokens are generated
    (and a warm one almost for free), and an answer that stops early never spends the rest of
    its budget. So a generated token drains one unit as it comes, and a job's end drains the
    rest of its cost at once."""

    generated: Window = field(default_factory=Window)
    drained: Window = field(default_factory=Window)
    total: int = 0
    seq_rate: float = 0.0

    def add(self, tokens: int) -> None:
        self.total += tokens
        self.generated.add(tokens)
        self.drained.add(tokens)

    def ended(self, cost: int, generated: int) -> None:
        """A job ended: the part of its cost its generated tokens did not drain."""
        self.drained.add(max(0, cost - generated))

    def rate(self) -> float:
        return self.generated.rate()

    def drain_rate(self) -> float:
        return self.drained.rate()

    def sequence(self, tokens: int, seconds: float) -> None:
        """One sequence generated ``tokens`` in ``seconds`` (from its start, TTFT included)."""
        if tokens > 0 and seconds > 0:
            speed = tokens / seconds
            self.seq_rate = speed if self.seq_rate == 0 else 0.8 * self.seq_rate + 0.2 * speed


@dataclass(slots=True)
class JobOutcome:
    state: str
    tokens: int
    prompt_tokens: int = 0
    cached_tokens: int = 0


async def produced_so_far(store: JobStore, claimed: Claimed, extras: Extras) -> str:
    """Text already delivered for this job (non-empty only when it is being taken over); the
    logprobs delivered with it go into ``extras`` (for the final response)."""
    if claimed.tokens_done == 0:
        return ""
    entries = await store.read_log(claimed.job.model, claimed.job.id)
    tokens = [e for entry in entries for e in entry.batch.events if isinstance(e, TokenEvent)]
    extras.all_lp.extend(lp for e in tokens for lp in e.lp or ())
    return "".join(e.x for e in tokens)


async def run_job(
    *,
    store: JobStore,
    engine: Engine,
    claimed: Claimed,
    worker_id: str,
    coalesce_s: float,
    throughput: Throughput,
    first_write: asyncio.Event | None = None,
    sink: EmitSink | None = None,
) -> JobOutcome:
    """Generate ``claimed`` to its end; returns how it ended (``LeaseLost`` ends it quietly)."""
    job = claimed.job
    emitter = EventEmitter(sink or store, claimed, coalesce_s, first_write=first_write)
    tokens = 0
    bound = log.bind(job_id=job.id, request_id=job.request_id, model=job.model)
    try:
        prompt_tokens = await engine.count_prompt_tokens(job)
        await emitter.started(worker_id, prompt_tokens)
        failure = continuation_error(job, claimed.tokens_done, engine.continuable)
        if failure is not None:
            raise failure
        extras = Extras()
        produced = await produced_so_far(store, claimed, extras)
        stops = StopMatcher(job.params.stop)
        request = GenerationRequest(job, produced, claimed.tokens_done)
        stats = request.stats
        finish = "length"
        began = time.monotonic()
        stream = engine.generate(request)
        held = 0  # engine tokens whose text is not delivered yet (a possible stop prefix)
        try:
            async for item in stream:
                if not isinstance(item, str) and not (
                    item.text or item.tool_calls or item.logprobs
                ):
                    extras.take(item)  # only a finish reason (an upstream's last chunk)
                    continue
                tokens += 1
                held += 1
                throughput.add(1)
                text = item if isinstance(item, str) else extras.take(item)
                out = stops.feed(text)
                if extras.pending:
                    await emitter.token(out, held, *extras.flush())
                    held = 0
                elif out:
                    await emitter.token(out, engine_tokens=held)
                    held = 0
                if stops.stopped:
                    finish = "stop"
                    break
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        throughput.sequence(tokens, time.monotonic() - began)
        throughput.ended(job.cost_tokens, claimed.tokens_done + tokens)
        if finish == "length" and claimed.tokens_done + tokens < job.params.max_tokens:
            finish = "stop"  # the engine ended the sequence itself
        finish = extras.finish or finish
        tail = stops.flush()
        if tail or extras.pending:
            await emitter.token(tail, held, *extras.flush())
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=claimed.tokens_done + tokens,
            cached_tokens=min(stats.cached_tokens, prompt_tokens),
        )
        await emitter.done(finish, usage, **extras.final())
        bound.info(
            "job_completed",
            tokens=tokens,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            cached_tokens=usage.cached_tokens,
        )
        return JobOutcome("completed", tokens, prompt_tokens, usage.cached_tokens)
    except LeaseLost:
        bound.info("job_fenced", tokens=tokens)
        return JobOutcome("fenced", tokens)
    except EngineError as exc:
        bound.warning("job_failed", error=str(exc), code=exc.code)
        try:
            await emitter.error(exc.code, str(exc), exc.status)
        except LeaseLost:
            return JobOutcome("fenced", tokens)
        return JobOutcome("failed", tokens)
    finally:
        await emitter.aclose()
