"""The job API: submit, read, resume with Last-Event-ID, cancel, idempotency."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis

from shared.keys import Keys
from tests.helpers import gateway_settings, running_gateway, running_worker, worker_settings

CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = worker_settings(redis_url, sim_tokens_per_s=100.0)
    async with (
        running_gateway(gateway_settings(redis_url)) as base,
        running_worker(settings),
        httpx.AsyncClient(base_url=base, timeout=10) as http,
    ):
        yield http


async def read_sse(
    response: httpx.Response, limit: int | None = None
) -> list[tuple[int | None, str]]:
    """(event id, data) pairs; stops after ``limit`` data lines."""
    out: list[tuple[int | None, str]] = []
    event_id: int | None = None
    async for line in response.aiter_lines():
        if line.startswith("id: "):
            event_id = int(line[4:])
        elif line.startswith("data: "):
            out.append((event_id, line[6:]))
            event_id = None
            if limit is not None and len(out) >= limit:
                break
    return out


def text_of(frames: list[tuple[int | None, str]]) -> str:
    parts = []
    for _, data in frames:
        if data != "[DONE]":
            chunk = json.loads(data)
            for choice in chunk.get("choices", []):
                parts.append(choice.get("delta", {}).get("content") or "")
    return "".join(parts)


async def test_submit_then_stream_events(client: httpx.AsyncClient) -> None:
    submitted = await client.post("/v1/jobs", json=CHAT)
    assert submitted.status_code == 202
    job_id = submitted.json()["id"]
    async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        frames = await read_sse(response)
    assert frames[-1][1] == "[DONE]"
    ids = [i for i, _ in frames if i is not None]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    status = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert status["status"] == "completed" and status["output"] == text_of(frames)
    assert status["usage"]["completion_tokens"] == 12


async def test_resume_with_last_event_id_gets_exactly_the_rest(client: httpx.AsyncClient) -> None:
    headers = {"X-Cancel-On-Disconnect": "false"}
    async with client.stream(
        "POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers
    ) as response:
        job_id = response.headers["x-slipstream-job-id"]
        first = await read_sse(response, limit=4)
    last_id = first[-1][0]
    assert last_id is not None
    async with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(last_id)}
    ) as response:
        rest = await read_sse(response)
    ids = [i for i, _ in first + rest if i is not None]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # no gap, no duplicate
    full = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert text_of(first + rest) == full["output"]
    assert len(full["output"].split()) == 12


async def test_cancel_a_running_job(client: httpx.AsyncClient) -> None:
    job_id = (await client.post("/v1/jobs", json={**CHAT, "max_tokens": 500})).json()["id"]
    for _ in range(100):
        if (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "running":
            break
        await asyncio.sleep(0.02)
    cancelled = await client.delete(f"/v1/jobs/{job_id}")
    assert cancelled.json()["status"] == "cancelled"
    async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        frames = await read_sse(response)
    assert json.loads(frames[-2][1])["error"]["code"] == "cancelled"


async def test_idempotency_key_attaches_to_the_same_job(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = await client.post("/v1/jobs", json=CHAT, headers=headers)
    second = await client.post("/v1/jobs", json=CHAT, headers=headers)
    assert first.status_code == 202 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    a = await client.post("/v1/chat/completions", json=CHAT, headers={"Idempotency-Key": "k2"})
    b = await client.post("/v1/chat/completions", json=CHAT, headers={"Idempotency-Key": "k2"})
    assert a.headers["x-slipstream-job-id"] == b.headers["x-slipstream-job-id"]
    assert a.json()["choices"] == b.json()["choices"]


async def test_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/v1/jobs/nope"),
        ("GET", "/v1/jobs/nope/events"),
        ("DELETE", "/v1/jobs/nope"),
    ]:
        response = await client.request(method, path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "job_not_found"


async def finished_job(client: httpx.AsyncClient) -> tuple[str, list[tuple[int | None, str]]]:
    job_id = (await client.post("/v1/jobs", json=CHAT)).json()["id"]
    async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        frames = await read_sse(response)
    assert frames[-1][1] == "[DONE]"
    return job_id, frames


async def resume(client: httpx.AsyncClient, job_id: str, last: int) -> httpx.Response:
    """The events after ``last``, read whole; a stream that stays open fails the test."""
    url = f"/v1/jobs/{job_id}/events"
    async with asyncio.timeout(5):  # the gateway pings and polls for good when it hangs
        return await client.get(url, headers={"Last-Event-ID": str(last)})


@pytest.mark.parametrize("past", [0, 1, 1000])
async def test_resume_at_or_past_the_end_ends_at_once(client: httpx.AsyncClient, past: int) -> None:
    job_id, frames = await finished_job(client)
    final = max(i for i, _ in frames if i is not None)
    response = await resume(client, job_id, final + past)
    assert response.status_code == 200
    data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks and chunks[0]["choices"][0]["finish_reason"] == "length"
    assert "content" not in chunks[0]["choices"][0]["delta"]  # no text sent twice
    assert f"id: {final}" in response.text.splitlines()


async def test_resume_of_a_failed_job_past_its_end_ends_with_the_error(
    client: httpx.AsyncClient,
) -> None:
    job_id = (await client.post("/v1/jobs", json={**CHAT, "max_tokens": 500})).json()["id"]
    await client.delete(f"/v1/jobs/{job_id}")
    final = (await client.get(f"/v1/jobs/{job_id}")).json()["last_event_id"]
    response = await resume(client, job_id, final)
    data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == "cancelled"


async def test_expired_log_is_a_clear_error(client: httpx.AsyncClient, redis: Redis) -> None:
    job_id, _ = await finished_job(client)
    await redis.delete(Keys().job_log("sim-model", job_id))
    response = await resume(client, job_id, 0)
    assert response.status_code == 410
    assert response.json()["error"]["code"] == "job_log_unavailable"


async def test_log_with_a_hole_is_a_clear_error(client: httpx.AsyncClient, redis: Redis) -> None:
    job_id, _ = await finished_job(client)
    log_key = Keys().job_log("sim-model", job_id)
    entries = await redis.xrange(log_key)
    assert len(entries) >= 3
    await redis.xdel(log_key, entries[1][0])  # a batch in the middle is gone
    response = await resume(client, job_id, 0)
    assert response.status_code == 410
    assert response.json()["error"]["code"] == "job_log_unavailable"
