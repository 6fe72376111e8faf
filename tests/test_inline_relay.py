"""The inline relay: plain tokens written from the pub/sub reader while a stream's task waits.

What must hold: a message is taken inline only when it is the next in order from the current
claim and nothing is queued or being written; anything declined leaves no trace (the task's
path then handles it as before); a write that has to wait is finished by a task of its own,
and the stream's own writes wait for it. End to end, streams through a real gateway and
worker arrive whole and in order with most of their messages taken inline.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

import httpx
import openai
import pytest
from redis.asyncio import Redis

from gateway.app import create_app
from gateway.dispatch import Dispatch
from gateway.inline_relay import InlineRelay
from gateway.job_events import JobEvents
from gateway.multiplexer import Deadlines, Listener
from gateway.openai_format import ChunkWriter
from gateway.sse import Outlet, SendGuard, StreamCut
from shared.aio import start_now
from shared.jobs import JobStore
from shared.keys import Keys
from shared.models import Event, EventBatch, TokenEvent
from tests.helpers import (
    gateway_settings,
    make_job,
    running_app,
    running_gateway,
    running_worker,
    worker_settings,
)

USAGE = {"prompt_tokens": 1, "completion_tokens": 2}


def batch(*events: dict[str, Any], fence: int = 1) -> str:
    return EventBatch.model_validate({"events": list(events), "f": fence}).model_dump_json()


def tok(s: int) -> dict[str, Any]:
    return {"t": "token", "s": s, "x": f"w{s} "}


def reader(seq: int = 0) -> JobEvents:
    # ``take_inline`` needs neither the store nor the multiplexer
    events = JobEvents(None, None, "m", "j", after_seq=seq, fresh=True)  # type: ignore[arg-type]
    events.needs_log = False
    return events


def test_inline_events_are_the_next_plain_tokens_and_nothing_else() -> None:
    events = reader(seq=3)
    declined = [
        batch(tok(5)),  # a gap
        batch(tok(3)),  # already passed on
        batch(tok(4), fence=2),  # another claim's
        batch({"t": "started", "s": 3, "worker": "w1"}, tok(4)),  # a start: the task notes it
        batch(tok(4), {"t": "done", "s": 5, "finish_reason": "stop", "usage": USAGE}),  # the end
        batch(*(tok(4 + i) for i in range(5))),  # more than ``most``
        "{not json",
    ]
    for raw in declined:
        assert events.inline_events(raw, most=4) is None, raw
    taken = events.inline_events(batch(tok(4), tok(5)), most=4)
    assert taken is not None and [e.s for e in taken] == [4, 5]
    assert all(isinstance(e, TokenEvent) for e in taken) and events.seq == 3  # not yet taken
    events.advance(taken)
    assert events.seq == 5
    events.needs_log = True  # the task is about to read the log: nothing inline meanwhile
    assert events.inline_events(batch(tok(6)), most=4) is None


class BrokenWriter(ChunkWriter):
    def frames(self, events: Sequence[Event]) -> bytes:
        raise RuntimeError("cannot render")


async def test_a_batch_the_inline_relay_fails_on_reaches_the_task_whole() -> None:
    dispatch = Dispatch(
        None,  # type: ignore[arg-type]  # no store or multiplexer is reached here
        None,  # type: ignore[arg-type]
        make_job(),
        worker_wait_s=1.0,
        stall_timeout_s=60.0,
        worker_ttl_s=5.0,
    )
    dispatch.events.needs_log = False
    listener = dispatch.events.listener = Listener("c", 8, Deadlines())
    writer = BrokenWriter("completion", "cmpl-x", "m", include_usage=False)
    outlet = InlineRelay(dispatch, writer, StreamCut(), send_timeout_s=30.0)
    sent: list[bytes] = []

    async def send(message: Any) -> None:
        sent.append(message["body"])

    task = asyncio.current_task()
    assert task is not None
    outlet.send, outlet.guard = send, SendGuard(Deadlines(), task, outlet.cut)
    listener.sink = outlet
    waiting = asyncio.create_task(listener.wait(5.0))
    await asyncio.sleep(0)
    assert not listener.deliver(batch(tok(1)))  # the relay raised: the task's path has it
    assert await waiting and sent == [] and dispatch.events.seq == 0
    assert [e.s for e in dispatch.events._from_queue()] == [1]  # whole, not "passed on"


async def test_a_listener_offers_its_sink_only_while_its_reader_waits_on_an_empty_queue() -> None:
    taken: list[str] = []
    listener = Listener("c", 8, Deadlines())
    listener.sink = lambda raw: (taken.append(raw), raw != "no")[1]
    assert not listener.deliver("a")  # nobody waits: queued
    assert listener.take() == ["a"]
    waiting = asyncio.create_task(listener.wait(5.0))
    await asyncio.sleep(0)
    assert listener.deliver("b")  # taken inline: the reader sleeps on
    assert not waiting.done() and taken == ["b"]
    assert not listener.deliver("no")  # declined: queued, and the reader wakes
    assert await waiting and listener.take() == ["no"]

    def broken(raw: str) -> bool:
        raise RuntimeError("boom")

    listener.sink = broken
    waiting = asyncio.create_task(listener.wait(5.0))
    await asyncio.sleep(0)
    assert not listener.deliver("c")  # a failing sink loses nothing, and is dropped
    assert await waiting and listener.take() == ["c"] and listener.sink is None


async def test_start_now_runs_to_the_first_wait_and_a_task_finishes_the_rest() -> None:
    steps: list[str] = []

    async def quick() -> None:
        steps.append("quick")

    assert start_now(quick()) is None and steps == ["quick"]

    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def slow() -> None:
        steps.append("before")
        await gate
        steps.append("after")

    rest = start_now(slow())
    assert rest is not None and steps[-1] == "before"
    gate.set_result(None)
    await asyncio.wait_for(rest, 5.0)
    assert steps[-1] == "after"

    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def stuck() -> None:
        try:
            await never
        finally:
            steps.append("cleaned up")

    for stepped in (False, True):  # cancelled before the task's first step, and after it
        rest = start_now(stuck())
        assert rest is not None
        if stepped:
            await asyncio.sleep(0.01)
        rest.cancel()
        with pytest.raises(asyncio.CancelledError):
            await rest
        await asyncio.sleep(0)  # the done callbacks
        assert steps.pop() == "cleaned up"


async def test_a_write_that_waits_holds_the_next_until_it_is_done() -> None:
    sent: list[bytes] = []
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def send(message: Any) -> None:
        if message["body"] == b"slow":
            await gate
        sent.append(message["body"])

    outlet = Outlet(StreamCut(), send_timeout_s=30.0)
    assert not outlet.ready()  # no body begun yet
    task = asyncio.current_task()
    assert task is not None
    outlet.send, outlet.guard = send, SendGuard(Deadlines(), task, outlet.cut)
    outlet.write(b"one")
    assert sent == [b"one"] and outlet.ready()  # went straight out
    outlet.write(b"slow")
    assert not outlet.ready() and outlet.guard.send_by > 0  # under the send timeout
    drained = asyncio.create_task(outlet.drain())
    await asyncio.sleep(0.01)
    assert not drained.done()
    gate.set_result(None)
    await asyncio.wait_for(drained, 5.0)
    assert sent == [b"one", b"slow"] and outlet.ready() and outlet.guard.send_by == 0.0


@pytest.fixture
async def paced(redis_url: str):  # type: ignore[no-untyped-def]
    gateway = gateway_settings(redis_url)
    async with (
        running_gateway(gateway) as base,
        running_worker(worker_settings(redis_url, sim_tokens_per_s=200.0, coalesce_ms=0.0)),
    ):
        yield base


async def test_paced_streams_arrive_whole_and_in_order_mostly_inline(paced: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{paced}/v1", api_key="unused", max_retries=0)

    async def one(i: int) -> list[str]:
        stream = await client.completions.create(
            model="sim-model", prompt=f"inline {i}", max_tokens=40, stream=True
        )
        return [c.choices[0].text async for c in stream if c.choices]

    try:
        texts = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), 30.0)
    finally:
        await client.close()
    for pieces in texts:
        assert len("".join(pieces).split()) == 40
    async with httpx.AsyncClient(timeout=5.0) as http:
        metrics = (await http.get(f"{paced}/metrics")).text
    counts = dict(
        re.findall(r'slipstream_gateway_pubsub_messages_total\{path="(\w+)"\} (\S+)', metrics)
    )
    inline, task = float(counts["inline"]), float(counts["task"])
    print(counts)
    assert inline > 2 * task, counts  # the steady state went inline


async def test_a_reader_that_joins_at_the_tip_still_hears_its_client_leave(
    redis_url: str, redis: Redis
) -> None:
    """``GET /v1/jobs/{id}/events`` from the last event: nothing is replayed, so every frame
    could go inline; the disconnect watcher must run all the same, or the stream would live
    on (its listener, its task) until the job ends."""
    settings = gateway_settings(redis_url, stream_start_s=0.05)  # SSE before the next token
    app = create_app(settings)
    store = JobStore(redis, Keys(), ttl_s=60)
    async with (
        running_app(app, settings.port) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as http,
        running_worker(worker_settings(redis_url, sim_tokens_per_s=3.0, coalesce_ms=0.0)),
    ):
        body = {"model": "sim-model", "prompt": "tip", "max_tokens": 20}
        job_id = (await http.post("/v1/jobs", json=body)).json()["id"]
        seq = 0
        for _ in range(200):  # bounded: 4 s
            entries = await store.read_log("sim-model", job_id)
            seq = max((e.s for entry in entries for e in entry.batch.events), default=0)
            if seq >= 2:
                break
            await asyncio.sleep(0.02)
        assert seq >= 2
        path, tip = f"/v1/jobs/{job_id}/events", {"Last-Event-ID": str(seq)}
        async with http.stream("GET", path, headers=tip) as response:
            assert response.status_code == 200
            ids = []
            async for line in response.aiter_lines():
                ids += [line] if line.startswith("id:") else []
                if len(ids) == 2:
                    break
        assert ids == [f"id: {seq + 1}", f"id: {seq + 2}"]
        gateway = app.state.gateway
        for _ in range(100):  # bounded: 2 s, where the job has 5 s to go
            if job_id not in gateway.open_streams:
                break
            await asyncio.sleep(0.02)
        assert job_id not in gateway.open_streams


@pytest.mark.parametrize(("tokens_per_s", "pings"), [(10.0, "none"), (1.5, "between tokens")])
async def test_pings_come_when_the_stream_is_quiet_counting_frames_written_inline(
    redis_url: str, tokens_per_s: float, pings: str
) -> None:
    """Tokens every 0.1 s (inline) keep a stream with a 0.4 s ping period busy: no ping. Tokens
    every 0.67 s leave it quiet: a ping in each gap, from the stream's task."""
    gateway = gateway_settings(redis_url, sse_ping_s=0.4)
    worker = worker_settings(redis_url, sim_tokens_per_s=tokens_per_s, coalesce_ms=0.0)
    body = {"model": "sim-model", "prompt": "quiet", "max_tokens": 4 if pings != "none" else 20}
    lines: list[str] = []
    async with (
        running_gateway(gateway) as base,
        running_worker(worker),
        httpx.AsyncClient(base_url=base, timeout=10) as http,
        http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response,
    ):
        async for line in response.aiter_lines():
            lines.append(line)
    kinds = [("ping" if line == ": ping" else "id") for line in lines if line[:2] in (": ", "id")]
    assert kinds.count("id") == body["max_tokens"] + 1  # the tokens and the end
    if pings == "none":
        assert "ping" not in kinds, kinds
    else:  # three gaps of 0.67 s between four tokens
        assert kinds.count("ping") >= 3, kinds
