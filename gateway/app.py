"""``create_app(settings)``: the FastAPI application and its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.admission import Admission
from gateway.auth import authenticate
from gateway.metrics import GatewayMetrics
from gateway.multiplexer import PubSubMultiplexer
from gateway.openapi import document
from gateway.ratelimit import RateLimits
from gateway.request_context import RequestContextMiddleware
from gateway.routes import completions, dashboard, health, jobs, models
from gateway.routes import metrics as metrics_routes
from gateway.settings import GatewaySettings
from gateway.spare_channels import SpareChannels
from gateway.state import GatewayState
from shared.errors import SlipstreamError, error_envelope
from shared.jobs import JobStore
from shared.keys import Keys
from shared.redis import connect

log = structlog.get_logger("slipstream.gateway")


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        redis = connect(settings.redis_url, client_name="slipstream-gateway")
        keys = Keys(settings.prefix)
        spares = SpareChannels(keys.job_channel)
        mux = PubSubMultiplexer(redis, queue_size=settings.listener_queue_batches, spares=spares)
        await mux.start()
        state = GatewayState(
            settings=settings,
            redis=redis,
            keys=keys,
            store=JobStore(
                redis,
                keys,
                ttl_s=settings.job_log_ttl_s,
                fair_share_tokens=settings.fair_share_tokens,
                affinity=settings.affinity_policy(),
                min_replicas=settings.redis_min_replicas,
                replica_wait_ms=settings.redis_replica_wait_ms,
            ),
            mux=mux,
            admission=Admission(redis, keys, settings),
            limits=RateLimits(redis, keys),
            metrics=GatewayMetrics(CollectorRegistry()),
        )
        await state.admission.start()
        state.metrics.track_open_streams(lambda: len(state.open_streams))
        state.metrics.track_pubsub_reconnects(lambda: mux.reconnects)
        state.metrics.track_relay_paths(lambda: (mux.inline, mux.delivered - mux.inline))
        app.state.gateway = state
        log.info("gateway_started", host=settings.host, port=settings.port)
        try:
            yield {"gateway": state}
        finally:
            state.draining = True
            await state.admission.close()
            await mux.close()
            await redis.aclose()
            log.info("gateway_stopped")

    app = FastAPI(
        title="Slipstream gateway",
        version="0.1.0",
        description="OpenAI-compatible front door of a pull-based LLM dispatcher.",
        lifespan=lifespan,
        # FastAPI's own OpenTelemetry hooks look up three providers on every request (4 µs
        # measured, bench.micro telemetry); Slipstream exports Prometheus metrics instead
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    keyed = [Depends(authenticate)]  # 401 before the body is read when auth is on
    # lean: they call authenticate themselves; first, so that a request for them is matched
    # at once, not after every route FastAPI adds (the OpenAPI document, the docs pages)
    app.router.routes[:0] = completions.ROUTES
    app.include_router(jobs.router, dependencies=keyed)
    app.include_router(models.router, dependencies=keyed)
    app.include_router(health.router)
    app.include_router(metrics_routes.router)
    app.include_router(dashboard.router)
    app.add_middleware(RequestContextMiddleware)
    install_error_handlers(app)
    document(app, settings, completions.documented.routes)  # /openapi.json: routes, limits
    return app


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in the OpenAI envelope; no traceback ever reaches a client."""

    @app.exception_handler(SlipstreamError)
    async def slipstream_error(request: Request, exc: SlipstreamError) -> JSONResponse:
        return JSONResponse(exc.envelope(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        body = error_envelope(
            f"invalid request: {first.get('msg', 'invalid')}",
            "invalid_request_error",
            "invalid_request",
            param,
        )
        return JSONResponse(body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = error_envelope(str(exc.detail), "invalid_request_error", code)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RedisError)
    async def redis_down(request: Request, exc: RedisError) -> JSONResponse:
        log.warning("redis_unavailable", path=request.url.path, error=str(exc))
        body = error_envelope(
            "the queue is unreachable right now; nothing was accepted, retry shortly",
            "server_error",
            "queue_unavailable",
        )
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error", path=request.url.path)
        body = error_envelope("internal error", "server_error", "internal_error")
        return JSONResponse(body, status_code=500)
