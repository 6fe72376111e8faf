"""The gateway's Prometheus metrics, owned by one ``GatewayMetrics`` per app (no globals).

Request metrics are recorded by a ``RequestObserver`` that the OpenAI routes hang on their
``Dispatch``: it sees every event the client is sent and records the request once, when the
dispatch ends. Cluster gauges (queues, workers, capacity) are read from Redis when someone
asks: ``apply_cluster`` sets them from a fresh ``ClusterSnapshot`` just before rendering.
The dashboard's JSON is built from this same registry, so the page and ``/metrics`` agree.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from gateway.cluster import ClusterSnapshot, MasterWatch
from shared.models import DoneEvent, ErrorEvent, Event, JobRef, TokenEvent

if TYPE_CHECKING:
    from gateway.dispatch import Dispatch

log = structlog.get_logger("slipstream.gateway")

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)

# Error codes kept as outcomes; any other code counts as "error" (bounded label values).
ERROR_OUTCOMES = frozenset(
    {"cancelled", "deadline_exceeded", "no_worker_available", "worker_stalled"}
)


def outcome_of(event: ErrorEvent) -> str:
    return event.code if event.code in ERROR_OUTCOMES else "error"


class _ReadCounter:
    """A counter whose samples are read when scraped, for running totals kept elsewhere: the
    multiplexer's reconnects, or a Redis stream's ``entries-added``. ``read`` yields
    (label values, total) pairs."""

    def __init__(
        self,
        name: str,
        doc: str,
        labels: list[str],
        read: Callable[[], Iterable[tuple[list[str], float]]],
    ) -> None:
        self.name, self.doc, self.labels, self.read = name, doc, labels, read

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for values, total in self.read():
            family.add_metric(values, total)
        yield family


class Tally:
    """A running total that one event loop adds to and a ``_ReadCounter`` reads."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class GatewayMetrics:
    """Every metric the gateway exports, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry, *, recent: int = 100) -> None:
        self.registry = registry
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self._define_requests(registry)
        self._define_latency(registry)
        self._define_cluster(registry)
        self._define_redis(registry)
        ProcessCollector(registry=registry)
        GCCollector(registry=registry)

    def _define_requests(self, r: CollectorRegistry) -> None:
        by_request = ["model", "priority"]
        self.requests = Counter(
            "slipstream_gateway_requests",
            "Requests that reached a job, by how they ended",
            [*by_request, "outcome"],
            registry=r,
        )
        # Counted per event, so a plain tally read when scraped: a ``Counter`` child's ``inc``
        # takes a lock and checks its argument, ~1 µs of every relayed event's ~60
        self.streamed: dict[str, Tally] = {}
        r.register(
            _ReadCounter(
                "slipstream_gateway_streamed_tokens",
                "Tokens relayed to clients",
                ["model"],
                lambda: (([m], t.n) for m, t in sorted(self.streamed.items())),
            )
        )
        self.prompt_tokens = Counter(
            "slipstream_gateway_prompt_tokens",
            "Prompt tokens of completed requests",
            ["model"],
            registry=r,
        )
        self.cached_tokens = Counter(
            "slipstream_gateway_prompt_cached_tokens",
            "Prompt tokens the engines reused from their prefix caches "
            "(hit ratio: this / slipstream_gateway_prompt_tokens_total)",
            ["model"],
            registry=r,
        )
        self.in_flight = Gauge(
            "slipstream_gateway_in_flight_requests", "Requests being served", registry=r
        )
        self.open_streams = Gauge(
            "slipstream_gateway_open_streams", "Server-sent event streams open", registry=r
        )
        self.rejections = Counter(
            "slipstream_gateway_admission_rejections",
            "Requests refused by admission (429), by reason",
            ["model", "reason"],
            registry=r,
        )
        self.cluster_errors = Counter(
            "slipstream_gateway_cluster_read_errors",
            "Scrapes whose cluster gauges could not be read from Redis",
            registry=r,
        )

    def _define_latency(self, r: CollectorRegistry) -> None:
        by_request = ["model", "priority"]
        self.ttft = Histogram(
            "slipstream_gateway_time_to_first_token_seconds",
            "From accepting a request to its first token reaching the gateway",
            by_request,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "slipstream_gateway_inter_token_latency_seconds",
            "Mean time between two tokens of one request (one observation per request)",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "slipstream_gateway_request_duration_seconds",
            "End to end: from accepting a request to its last event",
            by_request,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "slipstream_gateway_queue_wait_seconds",
            "From accepting a request to a worker starting it",
            by_request,
            buckets=WAIT_BUCKETS,
            registry=r,
        )

    def _define_cluster(self, r: CollectorRegistry) -> None:
        q = ["model", "priority"]
        self.queue_length = Gauge(
            "slipstream_queue_length", "Entries in the queue stream (XLEN)", q, registry=r
        )
        self.queue_lag = Gauge(
            "slipstream_queue_lag", "Queue entries no worker has read yet", q, registry=r
        )
        self.queue_pending = Gauge(
            "slipstream_queue_pending", "Queue entries taken by a worker, not done", q, registry=r
        )
        self.waiting_jobs = Gauge(
            "slipstream_queue_waiting_jobs", "Jobs queued (backlog hash)", q, registry=r
        )
        self.waiting_tokens = Gauge(
            "slipstream_queue_waiting_tokens", "Token cost of the jobs queued", q, registry=r
        )
        self.live_workers = Gauge(
            "slipstream_live_workers", "Workers with a recent heartbeat", ["model"], registry=r
        )
        self.capacity_tokens = Gauge(
            "slipstream_capacity_tokens", "Token budget of the live workers", ["model"], registry=r
        )
        self.tokens_in_use = Gauge(
            "slipstream_tokens_in_use", "Tokens reserved by running jobs", ["model"], registry=r
        )
        self.tokens_per_second = Gauge(
            "slipstream_tokens_per_second",
            "Generation speed the live workers report (10 s window)",
            ["model"],
            registry=r,
        )
        self.capacity_seqs = Gauge(
            "slipstream_capacity_sequences",
            "Sequences the live workers can run at once (sum of max_seqs)",
            ["model"],
            registry=r,
        )
        self.seqs_in_use = Gauge(
            "slipstream_sequences_in_use",
            "Sequences running on the live workers",
            ["model"],
            registry=r,
        )
        self._cluster = [
            self.capacity_seqs,
            self.seqs_in_use,
            self.queue_length,
            self.queue_lag,
            self.queue_pending,
            self.waiting_jobs,
            self.waiting_tokens,
            self.live_workers,
            self.capacity_tokens,
            self.tokens_in_use,
            self.tokens_per_second,
        ]

    def _define_redis(self, r: CollectorRegistry) -> None:
        self.dead_lettered: dict[str, int] = {}  # model -> entries-added, from the last read
        r.register(
            _ReadCounter(
                "slipstream_dead_letter_jobs",
                "Jobs ever moved to the model's dead-letter stream (poison jobs), read from Redis",
                ["model"],
                lambda: (([m], n) for m, n in sorted(self.dead_lettered.items())),
            )
        )
        self._reconnects: Callable[[], int] = lambda: 0  # no multiplexer: nothing reconnected
        r.register(
            _ReadCounter(
                "slipstream_gateway_pubsub_reconnects",
                "Times this gateway's pub/sub connection to Redis was re-established "
                "(every open stream then repairs from its job log)",
                [],
                lambda: [([], self._reconnects())],
            )
        )
        self._relayed: Callable[[], tuple[int, int]] = lambda: (0, 0)
        r.register(
            _ReadCounter(
                "slipstream_gateway_pubsub_messages",
                "Pub/sub messages handed to this gateway's listeners (one count per listener), "
                "by path: 'inline' (written to the client from the pub/sub reader) or 'task' "
                "(queued for the listener's task: starts, ends, repairs, whatever came while "
                "the task was busy, and every message to a non-streaming request)",
                ["path"],
                lambda: zip([["inline"], ["task"]], self._relayed(), strict=True),
            )
        )
        self.masters = MasterWatch()
        self.redis_master_changes = Counter(
            "slipstream_gateway_redis_master_changes",
            "Redis masters (run_id) this gateway found that its previous read had not: a "
            "failover to a replica or a restart (in Cluster mode, per primary)",
            registry=r,
        )

    # --- recording ----------------------------------------------------------------------
    def track_pubsub_reconnects(self, count: Callable[[], int]) -> None:
        """Read the multiplexer's running total (``mux.reconnects``) at every scrape."""
        self._reconnects = count

    def track_relay_paths(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Read the multiplexer's (inline, task) message totals at every scrape."""
        self._relayed = counts

    def track_open_streams(self, count: Callable[[], int]) -> None:
        self.open_streams.set_function(count)

    def observe(self, job: JobRef, *, stream: bool, timed: bool = True) -> RequestObserver:
        """Start following one request; ``timed=False`` (a replayed job) records no latency."""
        return RequestObserver(self, job, stream=stream, timed=timed)

    def rejected(self, model: str, reason: str) -> None:
        self.rejections.labels(model, reason).inc()

    def apply_cluster(self, snap: ClusterSnapshot) -> None:
        """Replace every cluster gauge with ``snap`` (models gone since drop out)."""
        for gauge in self._cluster:
            gauge.clear()
        for q in snap.queues:
            labels = (q.model, q.priority)
            self.queue_length.labels(*labels).set(q.length)
            self.queue_lag.labels(*labels).set(q.lag)
            self.queue_pending.labels(*labels).set(q.pending)
            self.waiting_jobs.labels(*labels).set(q.waiting_jobs)
            self.waiting_tokens.labels(*labels).set(q.waiting_tokens)
        for m in snap.models:
            self.live_workers.labels(m.model).set(m.workers)
            self.capacity_tokens.labels(m.model).set(m.capacity_tokens)
            self.tokens_in_use.labels(m.model).set(m.tokens_in_use)
            self.tokens_per_second.labels(m.model).set(m.tokens_per_s)
            self.capacity_seqs.labels(m.model).set(m.capacity_seqs)
            self.seqs_in_use.labels(m.model).set(m.seqs_in_use)
        self.dead_lettered = {m.model: m.dead_lettered for m in snap.models}

    def samples(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """Every sample in the registry by name: what ``/metrics`` would show right now."""
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in self.registry.collect():
            for s in family.samples:
                out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
        return out


class RequestObserver:
    """Follows one request's events (fed by its ``Dispatch``); records it once, at the end."""

    __slots__ = (
        "closed",
        "ended_at",
        "job",
        "last_token_at",
        "metrics",
        "outcome",
        "stream",
        "streamed",
        "timed",
        "tokens",
    )

    def __init__(self, metrics: GatewayMetrics, job: JobRef, *, stream: bool, timed: bool) -> None:
        self.metrics = metrics
        self.job = job
        self.streamed = metrics.streamed.setdefault(job.model, Tally())  # once, not per event
        self.stream = stream
        self.timed = timed
        self.tokens = 0
        self.last_token_at: float | None = None
        self.ended_at: float | None = None
        self.outcome: str | None = None
        self.closed = False
        metrics.in_flight.inc()

    def on_events(self, events: Sequence[Event]) -> None:
        now = time.monotonic()
        tokens = 0
        for event in events:
            if isinstance(event, TokenEvent):
                tokens += 1
            elif isinstance(event, DoneEvent | ErrorEvent) and self.outcome is None:
                self.outcome = "completed" if isinstance(event, DoneEvent) else outcome_of(event)
                self.ended_at = now
                if isinstance(event, DoneEvent):
                    self.metrics.prompt_tokens.labels(self.job.model).inc(event.usage.prompt_tokens)
                    cached = event.usage.cached_tokens
                    self.metrics.cached_tokens.labels(self.job.model).inc(cached)
        if tokens:
            self.tokens += tokens
            self.last_token_at = now
            self.streamed.n += tokens

    def on_exit(self, dispatch: Dispatch, *, error: bool = False) -> None:
        """The dispatch ended; without a terminal event the client left (or the gateway did)."""
        if self.closed:
            return
        self.closed = True
        m, job = self.metrics, self.job
        m.in_flight.dec()
        outcome = self.outcome or ("error" if error else "disconnected")
        labels = (job.model, job.priority.value)
        m.requests.labels(*labels, outcome).inc()
        end = self.ended_at or time.monotonic()
        entry = self._timings(dispatch, end) if self.timed else {}
        if self.timed:
            m.duration.labels(*labels).observe(entry["duration_s"])
            if entry["queue_wait_s"] is not None:
                m.queue_wait.labels(*labels).observe(entry["queue_wait_s"])
            if entry["ttft_s"] is not None:
                m.ttft.labels(*labels).observe(entry["ttft_s"])
            if entry["itl_s"] is not None:
                m.inter_token.labels(job.model).observe(entry["itl_s"])
        entry |= {"request_id": job.request_id, "model": job.model, "priority": job.priority.value}
        entry |= {"outcome": outcome, "stream": self.stream, "tokens": self.tokens}
        log.info("request_finished", job_id=job.id, **entry)
        m.recent.append(entry | {"at": time.time()})

    def _timings(self, dispatch: Dispatch, end: float) -> dict[str, Any]:
        created, first = dispatch.created, dispatch.first_token_at
        itl = None
        if first is not None and self.last_token_at is not None and self.tokens > 1:
            itl = (self.last_token_at - first) / (self.tokens - 1)
        return {
            "duration_s": end - created,
            "queue_wait_s": None if dispatch.started_at is None else dispatch.started_at - created,
            "ttft_s": None if first is None else first - created,
            "itl_s": itl,
        }
