"""``SpareChannels``: ids handed out once, pools sized by demand and bounded, ids taken and
never listened to left; and through the multiplexer on a real Redis: a spare's channel is
subscribed before its job exists, and listening to it sends no ``SSUBSCRIBE``."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from redis.asyncio import Redis

from gateway.app import create_app
from gateway.entry import entry
from gateway.multiplexer import PubSubMultiplexer
from gateway.spare_channels import MODELS, SpareChannels
from shared.keys import Keys
from tests.helpers import gateway_settings, running_app, running_worker, worker_settings


def channel(model: str, job_id: str) -> str:
    return f"{model}:{job_id}"


def test_a_model_gets_spares_from_the_refill_after_it_is_first_asked_for() -> None:
    spares = SpareChannels(channel, least=2)
    assert spares.take("m") is None  # none yet: the job keeps the id it was built with
    new, leave = spares.refill()
    assert list(new) == ["m"] and len(new["m"]) == 2 and leave == []
    spares.add("m", new["m"])
    got = {spares.take("m"), spares.take("m")}
    assert got == set(new["m"])
    assert spares.take("m") is None  # none left
    assert all(spares.claim(channel("m", i)) for i in got)
    assert not any(spares.claim(channel("m", i)) for i in got)  # once only
    assert not spares.claim(channel("m", "never-a-spare"))


def test_the_pool_follows_demand_within_its_bounds() -> None:
    spares = SpareChannels(channel, least=2, most=50)
    spares.take("m")
    spares.add("m", spares.refill()[0]["m"])
    for _ in range(10):
        spares.take("m")
    new, _ = spares.refill()
    assert len(spares.pools["m"]) + len(new["m"]) == 20  # twice the last tick's demand
    spares.add("m", new["m"])
    for _ in range(100):
        spares.take("m")
    new, _ = spares.refill()
    spares.add("m", new.get("m", []))
    assert len(spares.pools["m"]) == 50  # at most ``most``
    sizes = []
    for _ in range(30):  # no demand: the target decays, the surplus beyond twice it is left
        new, leave = spares.refill()
        assert "m" not in new
        assert all(c.startswith("m:") for c in leave)
        sizes.append(len(spares.pools["m"]))
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[-1] == 4  # twice ``least``


def test_an_id_taken_and_never_listened_to_is_left() -> None:
    spares = SpareChannels(channel, least=1, unclaimed_s=0.05)
    spares.take("m")
    spares.add("m", spares.refill()[0]["m"])
    taken, listened = spares.take("m"), spares.take("m")  # both spares (demand 1: two)
    assert spares.claim(channel("m", listened))
    time.sleep(0.1)
    _, leave = spares.refill()
    assert leave == [channel("m", taken)]
    assert not spares.claim(channel("m", taken))


def test_spares_are_kept_for_a_bounded_number_of_models() -> None:
    spares = SpareChannels(channel)
    for i in range(MODELS + 5):
        spares.take(f"m{i}")
    assert len(spares.refill()[0]) == MODELS


def test_an_idle_model_loses_its_spares_and_lost_spares_are_dropped() -> None:
    spares = SpareChannels(channel, least=2, idle_s=0.05)
    spares.take("a"), spares.take("b")
    new, _ = spares.refill()
    for model, ids in new.items():
        assert spares.add(model, ids) == []
    lost = channel("a", spares.pools["a"][0])
    assert spares.drop([lost, "elsewhere"]) == [lost]
    assert len(spares.pools["a"]) == 1 and len(spares.pools["b"]) == 2
    left = [channel("a", i) for i in spares.pools["a"]]
    spares.take("b")
    time.sleep(0.06)
    spares.take("b")  # "b" was asked for again; "a" was not
    _, leave = spares.refill()
    assert "a" not in spares.pools and "b" in spares.pools
    assert [c for c in leave if c.startswith("a:")] == left
    assert spares.add("a", ["late"]) == [channel("a", "late")]  # retired meanwhile: left


class _Recording:
    """The channels each ``SSUBSCRIBE`` of a subscriber names."""

    def __init__(self, mux: PubSubMultiplexer) -> None:
        self.sent: list[tuple[str, ...]] = []
        self.inner = mux.subscriber.subscribe
        mux.subscriber.subscribe = self  # type: ignore[method-assign]

    async def __call__(self, *channels: str) -> None:
        self.sent.append(channels)
        await self.inner(*channels)


async def test_a_spare_channel_is_subscribed_before_its_job_exists(redis: Redis) -> None:
    keys = Keys()
    mux = PubSubMultiplexer(
        redis, queue_size=8, spares=SpareChannels(keys.job_channel, least=3, unclaimed_s=0.2)
    )
    sent = _Recording(mux).sent
    await mux.start()
    try:
        assert mux.spare_id("sim-model") is None  # the first: none, and the model gets spares
        deadline = time.monotonic() + 5
        while not mux.spares or len(mux.spares.pools.get("sim-model", [])) < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert len(sent) == 1 and len(sent[0]) >= 3  # all in one SSUBSCRIBE
        job_id = mux.spare_id("sim-model")
        assert job_id is not None
        name = keys.job_channel("sim-model", job_id)
        assert name in await redis.execute_command("PUBSUB", "SHARDCHANNELS")
        listener = await mux.subscribe(name)
        assert not any(name in channels for channels in sent[1:])  # no SSUBSCRIBE of its own
        await redis.execute_command("SPUBLISH", name, "hello")
        assert await listener.wait(5.0) and listener.take() == ["hello"]
        unclaimed = keys.job_channel("sim-model", str(mux.spare_id("sim-model")))
        while unclaimed in await redis.execute_command("PUBSUB", "SHARDCHANNELS"):
            assert time.monotonic() < deadline  # left once ``unclaimed_s`` passed
            await asyncio.sleep(0.05)
        await mux.unsubscribe(listener)
    finally:
        await mux.close()


async def test_a_streamed_request_takes_a_spare_and_gets_every_token(redis_url: str) -> None:
    settings = gateway_settings(redis_url, models=["sim-model"])
    app = create_app(settings)
    body = {"model": "sim-model", "prompt": "hello", "max_tokens": 6, "stream": True}
    async with (
        running_app(entry(app), settings.port) as base,
        running_worker(worker_settings(redis_url)),
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        await client.post("/v1/completions", json={**body, "stream": False})  # asks for spares
        spares = app.state.gateway.mux.spares
        deadline = time.monotonic() + 5
        while not spares.pools.get("sim-model"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        ready = set(spares.pools["sim-model"])
        async with client.stream("POST", "/v1/completions", json=body) as response:
            frames = [line async for line in response.aiter_lines() if line.startswith("data:")]
        assert response.headers["x-slipstream-job-id"] in ready
        assert frames[-1] == "data: [DONE]"
        chunks = [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert len(text.split()) == 6  # every token, once
