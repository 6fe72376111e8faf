"""The worker's Prometheus metrics and the small HTTP server that exposes them.

One ``WorkerMetrics`` per ``Worker``, with its own registry. Gauges read the worker's live
state when scraped (capacity, jobs in flight, tokens/s), so nothing has to keep them in step;
only finished jobs are counted as they happen. The server runs in the worker's event loop
(uvicorn, serving a two-route Starlette app) and stops with it: no thread, nothing left
listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import structlog
import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shared.aio import cancel_and_wait

if TYPE_CHECKING:
    from worker.service import Worker

log = structlog.get_logger("slipstream.worker")
STOP_S = 3.0  # the most the metrics server's shutdown may take


class _LiveCounter:
    """A counter whose value a function reads at scrape time (a running total kept elsewhere)."""

    def __init__(self, name: str, doc: str, labels: dict[str, str], read: Callable[[], float]):
        self.name, self.doc, self.labels, self.read = name, doc, labels, read

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), self.read())
        yield family


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        self.registry = registry
        self.model = model
        self.jobs = Counter(
            "slipstream_worker_jobs",
            "Jobs this worker ended, by outcome (completed, failed, fenced, cancelled, crashed)",
            ["model", "outcome"],
            registry=registry,
        )
        self.claims = Counter(
            "slipstream_worker_claims",
            "Jobs this worker took, by how: warm (it held the prefix or session), cold, "
            "stolen (reserved for a warm worker whose wait ended), takeover (expired lease)",
            ["model", "outcome"],
            registry=registry,
        )
        self.affinity_wait = Histogram(
            "slipstream_worker_affinity_wait_seconds",
            "How long a job this worker took had waited reserved for a warm worker",
            ["model"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "slipstream_worker_prompt_tokens",
            "Prompt tokens of the jobs this worker completed",
            ["model"],
            registry=registry,
        )
        self.cached_tokens = Counter(
            "slipstream_worker_prompt_cached_tokens",
            "Prompt tokens the engine reused from its cache (hit ratio: this / prompt tokens)",
            ["model"],
            registry=registry,
        )
        gauges = {
            "in_flight": ("slipstream_worker_in_flight_jobs", "Jobs running on this worker"),
            "capacity": ("slipstream_worker_capacity_tokens", "Token budget of this worker"),
            "in_use": ("slipstream_worker_tokens_in_use", "Tokens reserved by running jobs"),
            "rate": ("slipstream_worker_tokens_per_second", "Tokens generated/s (10 s window)"),
        }
        self.gauges = {
            key: Gauge(name, doc, ["model"], registry=registry)
            for key, (name, doc) in gauges.items()
        }
        ProcessCollector(registry=registry)
        GCCollector(registry=registry)
        self._server: tuple[uvicorn.Server, asyncio.Task[None]] | None = None

    @classmethod
    def for_worker(cls, worker: Worker) -> WorkerMetrics:
        """Metrics that read ``worker``'s capacity, running jobs and throughput when scraped."""
        metrics = cls(CollectorRegistry(), worker.settings.model)
        live: dict[str, Callable[[], float]] = {
            "in_flight": lambda: len(worker.running),
            "capacity": lambda: worker.capacity.tokens,
            "in_use": lambda: worker.capacity.tokens_in_use,
            "rate": worker.throughput.rate,
        }
        for key, read in live.items():
            metrics.gauges[key].labels(metrics.model).set_function(read)
        metrics.registry.register(
            _LiveCounter(
                "slipstream_worker_generated_tokens",
                "Tokens the engine generated on this worker",
                {"model": metrics.model},
                lambda: worker.throughput.total,
            )
        )
        return metrics

    def job_ended(self, outcome: str, prompt_tokens: int = 0, cached_tokens: int = 0) -> None:
        self.jobs.labels(self.model, outcome).inc()
        if prompt_tokens:
            self.prompt_tokens.labels(self.model).inc(prompt_tokens)
            self.cached_tokens.labels(self.model).inc(cached_tokens)

    def job_claimed(self, outcome: str, affinity_wait_ms: int) -> None:
        self.claims.labels(self.model, outcome).inc()
        if outcome in ("warm", "stolen") and affinity_wait_ms > 0:
            self.affinity_wait.labels(self.model).observe(affinity_wait_ms / 1000)

    # --- the /metrics server ------------------------------------------------------------
    async def start_server(self, port: int | None, host: str = "0.0.0.0") -> None:
        """Serve the registry on ``port`` (nothing when None), by uvicorn in this event loop
        (``_scrape_app``). The socket is bound here, so a port in use is
        an ``OSError`` at once; connections that come before uvicorn takes the socket wait
        in its backlog."""
        if port is None or self._server is not None:
            return
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)
        config = uvicorn.Config(
            _scrape_app(self.registry),
            interface="asgi3",
            log_config=None,
            log_level="warning",  # not its start and stop: they are the worker's to log
            access_log=False,
            proxy_headers=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        server = _InLoopServer(config)
        self._server = (server, asyncio.create_task(server.serve([sock]), name="metrics"))
        log.info("metrics_listening", host=host, port=sock.getsockname()[1])

    async def stop_server(self) -> None:
        if self._server is None:
            return
        (server, task), self._server = self._server, None
        server.should_exit = True  # uvicorn looks every 0.1 s, then closes within its timeout
        await asyncio.wait([task], timeout=STOP_S)
        await cancel_and_wait([task])
        if not task.cancelled() and (error := task.exception()) is not None:
            log.warning("metrics_server_failed", error=repr(error))


def _scrape_app(registry: CollectorRegistry) -> Starlette:
    """``GET`` (or ``HEAD``) ``/metrics`` or ``/``: the registry, in the format the scraper
    asks for (prometheus-client's ``choose_encoder``); 404 elsewhere, 405 for other methods."""

    async def scrape(request: Request) -> Response:
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(registry), media_type=content_type)

    return Starlette(routes=[Route("/metrics", scrape), Route("/", scrape)])


class _InLoopServer(uvicorn.Server):
    """uvicorn inside the worker's loop. Its ``serve`` takes SIGINT and SIGTERM for itself
    while it runs (``capture_signals``); the worker handles those, so it keeps them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
