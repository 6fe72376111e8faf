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
from typing import Any

import httpx
import openai
import pytest

from gateway.job_events import JobEvents
from gateway.multiplexer import Deadlines, Listener
from gateway.sse import Outlet, SendGuard, StreamCut
from shared.aio import start_now
from shared.models import EventBatch, TokenEvent
from tests.helpers import gateway_settings, running_gateway, running_worker, worker_settings

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


def test_take_inline_takes_the_next_plain_tokens_and_declines_the_rest_untouched() -> None:
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
        assert events.take_inline(raw, most=4) is None, raw
        assert events.seq == 3  # nothing changed
    taken = events.take_inline(batch(tok(4), tok(5)), most=4)
    assert taken is not None and [e.s for e in taken] == [4, 5]
    assert all(isinstance(e, TokenEvent) for e in taken) and events.seq == 5
    events.needs_log = True  # the task is about to read the log: nothing inline meanwhile
    assert events.take_inline(batch(tok(6)), most=4) is None


async def test_a_listener_offers_to_its_sink_only_while_its_reader_waits_with_nothing_queued() -> (
    None
):
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
