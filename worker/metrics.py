"""The worker's Prometheus metrics and the small HTTP server that exposes them.

One ``WorkerMetrics`` per ``Worker``, with its own registry. Gauges read the worker's live
state when scraped (capacity, jobs in flight, tokens/s), so nothing has to keep them in step;
only finished jobs are counted as they happen. The server runs in the worker's event loop
(``asyncio.start_server``) and stops with it: no thread, nothing left listening.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from contextlib import suppress
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest as render
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

if TYPE_CHECKING:
    from worker.service import Worker

log = structlog.get_logger("slipstream.worker")
MAX_HEADER_LINES = 100
READ_TIMEOUT_S = 5.0


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
        self._server: asyncio.Server | None = None

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
        """Serve ``GET /metrics`` on ``port`` (nothing when None)."""
        if port is None or self._server is not None:
            return
        self._server = await asyncio.start_server(self._handle, host, port)
        log.info("metrics_listening", host=host, port=port)

    async def stop_server(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with suppress(OSError):
                await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
            for _ in range(MAX_HEADER_LINES):
                line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
                if line in (b"\r\n", b"\n", b""):
                    break
            writer.write(self._respond(request))
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()

    def _respond(self, request_line: bytes) -> bytes:
        parts = request_line.decode("latin-1").split()
        path = parts[1].split("?")[0] if len(parts) >= 2 else ""
        if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
            status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET /metrics\n"
        elif path in ("/metrics", "/"):
            status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, render(self.registry)
        else:
            status, ctype, body = "404 Not Found", "text/plain", b"try /metrics\n"
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode("latin-1") + (b"" if parts[:1] == ["HEAD"] else body)
