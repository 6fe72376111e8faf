"""Rate-limit charges are safe to repeat (issue 12).

redis-py replays a command after a connection error, also when it already ran and only its
reply was lost (``shared/redis.py``). ``LossyProxy`` makes exactly that happen to a charge: the
charge runs in Redis, its reply is swallowed, the client's retry runs it again. The budget must
be charged once: the same headers, the same counters, and the next request still fits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from gateway.apikeys import ApiKey
from gateway.ratelimit import RateLimits
from shared.errors import RateLimited
from shared.keys import Keys
from shared.redis import connect
from tests.helpers import RedisProcess, make_job
from tests.lossy_proxy import LossyProxy

KEY = ApiKey(key_hash="ab" * 32, tenant="acme", rpm=2, tpm=100)


@pytest.fixture
async def proxy(redis_server: RedisProcess) -> AsyncIterator[LossyProxy]:
    p = await LossyProxy(redis_server.port).start()
    yield p
    await p.close()


async def charges(limits: RateLimits, proxy: LossyProxy, lose_first: bool) -> list[object]:
    """Two requests within the key's 2 per minute, then a third; the first reply lost or not."""
    out: list[object] = []
    for n in range(3):
        if n == 0 and lose_first:
            proxy.arm(KEY.key_hash.encode())  # the first command naming the key: the charge
        try:
            headers = await limits.charge(KEY, make_job(max_tokens=20))
            out.append(headers["x-ratelimit-remaining-requests"])
        except RateLimited as refused:
            out.append(refused.code)
    return out


async def test_a_replayed_charge_counts_once(redis: Redis, proxy: LossyProxy) -> None:
    seen = []
    for lose in (False, True):
        await redis.flushall()
        client = connect(proxy.url, socket_timeout=5.0)
        try:
            before = len(proxy.lost)
            seen.append(await charges(RateLimits(client, Keys()), proxy, lose))
            assert len(proxy.lost) - before == int(lose), "the armed loss never happened"
        finally:
            await client.aclose()
        if lose:  # the charge ran and its reply (not an error) was what got lost
            assert proxy.lost[-1].reply and not proxy.lost[-1].reply.startswith(b"-")
    assert seen[0] == ["1", "0", "rate_limit_exceeded"]
    assert seen[1] == seen[0]  # today: the replay charged twice, the second request was refused


async def test_the_same_request_charged_again_answers_the_same(redis: Redis) -> None:
    """The replay guard is the request (job id): a second charge of one job changes nothing;
    a refused request costs nothing, in either limit."""
    limits = RateLimits(redis, Keys())
    job = make_job(max_tokens=20)
    first = await limits.charge(KEY, job)
    assert await limits.charge(KEY, job) == first
    assert first["x-ratelimit-remaining-requests"] == "1"
    assert first["x-ratelimit-remaining-tokens"] == str(100 - job.cost_tokens)
    with pytest.raises(RateLimited) as big:  # over 100 tokens: refused by tokens, no request used
        await limits.charge(KEY, make_job(max_tokens=100))
    assert big.value.headers["x-ratelimit-remaining-requests"] == "1"
    assert int(big.value.headers["Retry-After"]) == 60  # larger than the budget: never fits
    assert (await limits.charge(KEY, make_job()))["x-ratelimit-remaining-requests"] == "0"
