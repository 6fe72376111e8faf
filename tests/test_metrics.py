"""Prometheus metrics: the gateway's request metrics, cluster gauges read from Redis at scrape
time, admission rejections, and the worker's own /metrics server."""

from __future__ import annotations

import socket

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from gateway.apikeys import Scope, create_key, revoke_key
from gateway.app import create_app
from shared.jobs import JobStore
from shared.keys import Keys
from tests.helpers import (
    free_port,
    gateway_settings,
    make_job,
    running_app,
    running_gateway,
    running_worker,
    worker_settings,
)

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Series:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(series: Series, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in series.items() if n == name and want <= ls)


async def scrape(url: str) -> Series:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


async def test_requests_latency_and_worker_counters(redis_url: str) -> None:
    port = free_port()
    worker = worker_settings(
        redis_url, metrics_port=port, metrics_host="127.0.0.1", sim_fail_prompt="FAIL"
    )
    async with (
        running_gateway(gateway_settings(redis_url)) as base,
        running_worker(worker),
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        for stream, priority in ((False, "high"), (True, "low")):
            body = {"model": "sim-model", "prompt": "hi", "max_tokens": 6, "stream": stream}
            r = await client.post("/v1/completions", json=body, headers={"X-Priority": priority})
            assert r.status_code == 200
        failed = {"model": "sim-model", "prompt": "FAIL now", "max_tokens": 6}
        assert (await client.post("/v1/completions", json=failed)).status_code >= 500
        gw = await scrape(f"{base}/metrics")
        wk = await scrape(f"http://127.0.0.1:{port}/metrics")

    requests = "slipstream_gateway_requests_total"
    assert value(gw, requests) == 3
    assert value(gw, requests, outcome="completed", priority="high") == 1
    assert value(gw, requests, outcome="completed", priority="low") == 1
    assert value(gw, requests, outcome="error", priority="normal") == 1
    assert value(gw, "slipstream_gateway_streamed_tokens_total", model="sim-model") == 12
    assert value(gw, "slipstream_gateway_request_duration_seconds_count") == 3
    assert value(gw, "slipstream_gateway_time_to_first_token_seconds_count") == 2
    assert value(gw, "slipstream_gateway_inter_token_latency_seconds_count") == 2
    assert value(gw, "slipstream_gateway_queue_wait_seconds_count") == 3
    assert value(gw, "slipstream_gateway_queue_wait_seconds_bucket", le="+Inf") == 3
    assert value(gw, "slipstream_gateway_in_flight_requests") == 0
    assert value(gw, "slipstream_live_workers", model="sim-model") == 1
    assert value(gw, "slipstream_capacity_tokens", model="sim-model") == worker.capacity_tokens

    assert value(wk, "slipstream_worker_jobs_total", outcome="completed") == 2
    assert value(wk, "slipstream_worker_jobs_total", outcome="failed") == 1
    assert value(wk, "slipstream_worker_generated_tokens_total", model="sim-model") == 12
    assert value(wk, "slipstream_worker_capacity_tokens") == worker.capacity_tokens
    assert value(wk, "slipstream_worker_in_flight_jobs") == 0
    assert value(wk, "slipstream_worker_tokens_in_use") == 0
    assert value(wk, "slipstream_worker_tokens_per_second") > 0
    assert value(wk, "process_resident_memory_bytes") > 0


async def test_cluster_gauges_come_from_redis(redis_url: str, redis: Redis) -> None:
    """Queued jobs (no worker) show up per priority at scrape time, and the dashboard agrees."""
    store = JobStore(redis, Keys(), ttl_s=60)
    jobs = [make_job(priority=p, max_tokens=10) for p in ("high", "low", "low")]
    for job in jobs:
        await store.enqueue(job)
    async with (
        running_gateway(gateway_settings(redis_url)) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        gw = await scrape(f"{base}/metrics")
        data = (await client.get("/dashboard/data")).json()
    for name in (
        "slipstream_queue_waiting_jobs",
        "slipstream_queue_length",
        "slipstream_queue_lag",
    ):
        assert value(gw, name, model="sim-model", priority="high") == 1, name
        assert value(gw, name, model="sim-model", priority="low") == 2, name
        assert value(gw, name, model="sim-model", priority="normal") == 0, name
    cost = jobs[1].cost_tokens
    assert value(gw, "slipstream_queue_waiting_tokens", priority="low") == 2 * cost
    assert value(gw, "slipstream_queue_pending") == 0
    assert value(gw, "slipstream_live_workers", model="sim-model") == 0
    [model] = data["models"]
    assert model["queues"]["low"] == {
        "length": 2,
        "lag": 2,
        "pending": 0,
        "waiting_jobs": 2,
        "waiting_tokens": 2 * cost,
    }
    assert model["workers"] == 0 and data["workers"] == [] and data["redis_ok"] is True


async def test_admission_rejections_counted_by_model_and_reason(
    redis: Redis, redis_url: str
) -> None:
    """Real refusals (a full queue, through the HTTP API) are counted where they happen."""
    from tests.test_admission import chat, plant_worker, queue_tokens

    await plant_worker(redis, tokens_per_s=100.0)
    await queue_tokens(redis, 100, priority="high", n=2)
    settings = gateway_settings(redis_url, queue_limits={"sim-model": {"tokens": 250}})
    app = create_app(settings)
    async with running_app(app, settings.port) as base, httpx.AsyncClient(base_url=base) as client:
        for _ in range(2):
            response = await client.post("/v1/chat/completions", json=chat(max_tokens=100))
            assert response.status_code == 429 and response.json()["error"]["code"] == "queue_full"
        gw = await scrape(f"{base}/metrics")
        data = (await client.get("/dashboard/data")).json()
    name = "slipstream_gateway_admission_rejections_total"
    assert value(gw, name, model="sim-model", reason="queue_full") == 2
    assert data["gateway"]["admission_rejections_total"] == 2


async def test_worker_metrics_server_paths_and_clean_stop(redis_url: str) -> None:
    port = free_port()
    worker = worker_settings(redis_url, metrics_port=port, metrics_host="127.0.0.1")
    async with running_worker(worker), httpx.AsyncClient(timeout=5) as client:
        assert (await client.get(f"http://127.0.0.1:{port}/nope")).status_code == 404
        assert (await client.post(f"http://127.0.0.1:{port}/metrics")).status_code == 405
        head = await client.head(f"http://127.0.0.1:{port}/metrics")
        assert head.status_code == 200 and head.content == b""
    with pytest.raises(ConnectionRefusedError):  # stopped: nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


async def test_operator_endpoints_need_a_metrics_or_admin_key(redis_url: str, redis: Redis) -> None:
    """With auth on: no key 401 (Basic challenge, so a browser asks), a tenant's key 403, a
    ``metrics`` or ``admin`` key 200 as a bearer token (Prometheus) or a Basic password
    (browser); a ``metrics`` key cannot submit work; a revoked one is 401."""
    keys = Keys()
    tenant, _ = await create_key(redis, keys, "acme")
    ops, ops_record = await create_key(redis, keys, "prometheus", scopes=[Scope.METRICS])
    admin, _ = await create_key(redis, keys, "root", scopes=[Scope.ADMIN])
    paths = ["/metrics", "/dashboard", "/dashboard/data", "/dashboard/static/dashboard.js"]
    settings = gateway_settings(redis_url, auth_required=True)
    async with (
        running_gateway(settings) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        for path in paths:
            bare = await client.get(path)
            assert bare.status_code == 401, path
            assert bare.headers["www-authenticate"].startswith("Basic "), path
            assert (await client.get(path, headers=bearer(tenant))).status_code == 403, path
            assert (await client.get(path, headers=bearer("sk-slip-nope"))).status_code == 401
            for secret in (ops, admin):
                assert (await client.get(path, headers=bearer(secret))).status_code == 200, path
            assert (await client.get(path, auth=("ops", ops))).status_code == 200, path
            assert (await client.get(path, auth=(ops, ""))).status_code == 200, path
        scraped = parse((await client.get("/metrics", headers=bearer(ops))).text)
        assert value(scraped, "slipstream_live_workers", model="sim-model") == 0
        job = {"model": "sim-model", "prompt": "hi", "max_tokens": 4}
        refused = await client.post("/v1/jobs", json=job, headers=bearer(ops))
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "insufficient_scope"
        assert (await client.post("/v1/jobs", json=job, headers=bearer(admin))).status_code == 202
        assert (await client.get("/healthz")).status_code == 200  # probes stay open
        assert (await client.get("/readyz")).status_code == 200
        await revoke_key(redis, keys, ops_record.id)
        assert (await client.get("/metrics", headers=bearer(ops))).status_code == 401


async def test_operator_endpoints_open_when_auth_is_off(redis_url: str) -> None:
    async with (
        running_gateway(gateway_settings(redis_url)) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        for path in ("/metrics", "/dashboard", "/dashboard/data"):
            assert (await client.get(path)).status_code == 200, path


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}
