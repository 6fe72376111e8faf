"""The live dashboard in headless Chromium while jobs run: numbers move and match /metrics.

Auth is on, as in the shipped deployments: the browser opens the page with a ``metrics`` key
as its Basic auth password (what a person types into the browser's prompt), the page's polls
carry it, and the load runs with a tenant's ``inference`` key.

Leaves a full-page screenshot at ``artifacts/dashboard.png``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from gateway.apikeys import Scope, create_key
from shared.keys import Keys
from tests.browser import Page, chromium, chromium_path
from tests.helpers import (
    free_port,
    gateway_settings,
    running_gateway,
    running_worker,
    worker_settings,
)

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
PRIORITIES = ("high", "normal", "low")

pytestmark = pytest.mark.slow


async def client_loop(base: str, secret: str, n: int, stop: asyncio.Event) -> None:
    """One client sending requests back to back: mixed priorities, streams, a few deadlines."""
    auth = {"Authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(base_url=base, timeout=30, headers=auth) as client:
        k = 0
        while not stop.is_set():
            k += 1
            body = {"model": "sim-model", "prompt": f"load {n} {k}", "max_tokens": 24}
            body["stream"] = k % 2 == 0
            headers = {"X-Priority": PRIORITIES[(n + k) % 3], "X-Request-Id": f"load-{n}-{k}"}
            if (n + k) % 5 == 0:
                headers["X-Deadline-Ms"] = "250"  # some expire in the queue: not completed
            async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
                async for _ in r.aiter_bytes():
                    pass


@contextlib.asynccontextmanager
async def load(base: str, secret: str, clients: int = 6) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(client_loop(base, secret, n, stop)) for n in range(clients)]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


async def scrape(base: str, secret: str) -> dict[str, float]:
    """Sums of every sample in ``/metrics`` by sample name (as Prometheus scrapes: bearer)."""
    auth = {"Authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{base}/metrics", headers=auth)
        assert response.status_code == 200
        text = response.text
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            sums[s.name] = sums.get(s.name, 0.0) + s.value
    return sums


async def stat(page: Page, name: str) -> float:
    return float(await page.evaluate(f"document.getElementById('stat-{name}').dataset.value"))


async def wait_until_stat(page: Page, name: str, want: float, timeout: float = 5.0) -> float:
    end = asyncio.get_running_loop().time() + timeout
    while (seen := await stat(page, name)) != want and asyncio.get_running_loop().time() < end:
        await asyncio.sleep(0.2)
    return seen


async def test_dashboard_live_in_chromium(redis_url: str, redis: Redis, tmp_path: Path) -> None:
    chromium_path()  # fails with a clear message when the browser is missing
    ops, _ = await create_key(redis, Keys(), "ops", scopes=[Scope.METRICS])
    tenant, _ = await create_key(redis, Keys(), "acme")
    worker = worker_settings(
        redis_url,
        capacity_tokens=60,  # two jobs (about 27 tokens each) at a time
        max_seqs=4,
        sim_tokens_per_s=40.0,
        metrics_port=free_port(),
        metrics_host="127.0.0.1",
        worker_id="sim-worker-1",
        heartbeat_s=1.0,  # the default; a 0.2 s beat under this load trips a worker-stop race
    )
    async with (
        running_gateway(gateway_settings(redis_url, auth_required=True)) as base,
        running_worker(worker),
        chromium(tmp_path / "profile") as page,
    ):
        async with httpx.AsyncClient(timeout=10) as client:  # no key, a tenant's key
            assert (await client.get(f"{base}/dashboard")).status_code == 401
            bearer = {"Authorization": f"Bearer {tenant}"}
            assert (await client.get(f"{base}/dashboard/data", headers=bearer)).status_code == 403
        await page.navigate(base.replace("http://", f"http://ops:{ops}@") + "/dashboard")
        await page.wait_for("window.slipstream && window.slipstream.polls > 0")
        assert await page.evaluate("window.slipstream.errors") == 0
        async with load(base, tenant):
            before = await stat(page, "requests")
            streamed_before = await stat(page, "streamed")
            await asyncio.sleep(8)  # the charts gather a few seconds of history
            assert await stat(page, "requests") > before, "the requests counter did not move"
            assert await stat(page, "streamed") > streamed_before
            queued = (
                "Math.max(...['high','normal','low'].flatMap(p => window.slipstream.history[p]))"
            )
            assert await page.evaluate(queued) > 0, "the queue chart never saw a waiting job"
            workers = await page.evaluate("document.querySelector('#workers tbody').innerText")
            assert "sim-worker-1" in workers
            recent = await page.evaluate("document.querySelector('#recent tbody').innerText")
            assert "load-" in recent
            await page.screenshot(ARTIFACTS / "dashboard.png")

        # Load stopped: once the page has polled again it shows exactly what /metrics says.
        metrics = await scrape(base, ops)
        total = metrics["slipstream_gateway_requests_total"]
        assert total > 0
        assert await wait_until_stat(page, "requests", total) == total
        assert await stat(page, "streamed") == metrics["slipstream_gateway_streamed_tokens_total"]
        completed = await page.evaluate("window.slipstream.last.gateway.requests_by_outcome")
        assert sum(completed.values()) == total
        assert await stat(page, "completed") == completed["completed"]
        assert await stat(page, "workers") == metrics["slipstream_live_workers"] == 1
        assert await stat(page, "in-flight") == metrics["slipstream_gateway_in_flight_requests"]
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
