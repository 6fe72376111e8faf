"""``SpareChannels``: ids handed out once, pools sized by demand and bounded, ids taken and
never listened to left; and through the multiplexer on a real Redis: a spare's channel is
subscribed before its job exists, and listening to it sends no ``SSUBSCRIBE``."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from gateway.multiplexer import PubSubMultiplexer
from gateway.spare_channels import MODELS, SpareChannels
from shared.keys import Keys


def channel(model: str, job_id: str) -> str:
    return f"{model}:{job_id}"


def test_a_model_gets_spares_from_the_refill_after_it_is_first_asked_for() -> None:
    spares = SpareChannels(channel, least=2)
    first = spares.take("m")
    new, leave = spares.refill()
    assert list(new) == ["m"] and len(new["m"]) == 2 and leave == []
    assert first not in new["m"]
    spares.add("m", new["m"])
    got = {spares.take("m"), spares.take("m")}
    assert got == set(new["m"])
    assert spares.take("m") not in got  # none left: a new id
    assert all(spares.claim(channel("m", i)) for i in got)
    assert not any(spares.claim(channel("m", i)) for i in got)  # once only
    assert not spares.claim(channel("m", first))  # never a spare


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


async def test_a_spare_channel_is_subscribed_before_its_job_exists(redis: Redis) -> None:
    keys = Keys()
    mux = PubSubMultiplexer(
        redis, queue_size=8, spares=SpareChannels(keys.job_channel, least=3, unclaimed_s=0.2)
    )
    await mux.start()
    try:
        mux.job_id("sim-model")  # the first: a plain id, and the model gets spares
        deadline = time.monotonic() + 5
        while not mux.spares or len(mux.spares.pools.get("sim-model", [])) < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        job_id = mux.job_id("sim-model")
        name = keys.job_channel("sim-model", job_id)
        assert name in await redis.execute_command("PUBSUB", "SHARDCHANNELS")
        await redis.config_resetstat()
        listener = await mux.subscribe(name)
        assert "cmdstat_ssubscribe" not in await redis.info("commandstats")
        await redis.execute_command("SPUBLISH", name, "hello")
        assert await listener.wait(5.0) and listener.take() == ["hello"]
        unclaimed = keys.job_channel("sim-model", mux.job_id("sim-model"))
        while unclaimed in await redis.execute_command("PUBSUB", "SHARDCHANNELS"):
            assert time.monotonic() < deadline  # left once ``unclaimed_s`` passed
            await asyncio.sleep(0.05)
        await mux.unsubscribe(listener)
    finally:
        await mux.close()
