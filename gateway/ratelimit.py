"""Per-key rate limits (requests/min, tokens/min) shared by every gateway replica.

A request costs one request and ``job.cost_tokens`` tokens (prompt estimate + max_tokens, as
OpenAI counts it at admission). Both limits are checked and charged in one Lua script
(``shared/lua/charge.lua``), all or nothing: a refused request costs nothing. Answers carry OpenAI's
``x-ratelimit-*`` headers.

The counters are sliding-window counters (the previous minute's count weighted by how much of
it is still in the window, plus this minute's), one small hash per key and limit
(``keys.rate_window``), judged by Redis's clock (``TIME``), never a gateway's.

**Safe to repeat.** redis-py replays a command after a connection error, also when the script
already ran and only its reply was lost (``shared/redis.py``). The script is keyed by the
request (the job id): its answer is stored under ``keys.rate_charge`` for a minute, and a
replay returns that answer instead of charging again. The price is one short string per
limited request for a minute (about 100 bytes), only for keys that have limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.apikeys import ApiKey
from shared import scripts
from shared.errors import RateLimited
from shared.keys import Keys
from shared.models import Job
from shared.redis import RedisClient

WINDOW_MS = 60_000
CHARGE_TTL_MS = WINDOW_MS  # longer than any replay: redis-py gives up within seconds


@dataclass(frozen=True, slots=True)
class Limit:
    name: str  # "requests" or "tokens": the header's suffix and the counter's name
    amount: int  # per minute
    cost: int  # what this request takes from it


class RateLimits:
    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self.redis, self.keys = redis, keys

    async def charge(self, key: ApiKey | None, job: Job) -> dict[str, str]:
        """Charge ``job`` to ``key``'s budgets; the headers to send, or ``RateLimited``.

        Calling it again for the same job (a replay) charges nothing and answers the same.
        """
        if key is None or not (key.rpm or key.tpm):
            return {}
        limits = [Limit("requests", key.rpm, 1)] if key.rpm else []
        limits += [Limit("tokens", key.tpm, job.cost_tokens)] if key.tpm else []
        answer = await scripts.CHARGE.call(
            self.redis,
            charge=self.keys.rate_charge(key.key_hash, job.id),
            windows=[self.keys.rate_window(key.key_hash, lim.name) for lim in limits],
            window_ms=WINDOW_MS,
            charge_ttl_ms=CHARGE_TTL_MS,
            limits=[n for lim in limits for n in (lim.amount, lim.cost)],
        )
        refused, retry_ms, *stats = str(answer).split("|")
        headers: dict[str, str] = {}
        for lim, stat in zip(limits, stats, strict=True):
            remaining, reset_ms = stat.split(",")
            headers[f"x-ratelimit-limit-{lim.name}"] = str(lim.amount)
            headers[f"x-ratelimit-remaining-{lim.name}"] = remaining
            headers[f"x-ratelimit-reset-{lim.name}"] = f"{math.ceil(int(reset_ms) / 1000)}s"
        if int(refused):
            lim = limits[int(refused) - 1]
            wait = max(1, math.ceil(int(retry_ms) / 1000))
            raise RateLimited(
                f"rate limit reached: {lim.amount} {lim.name} per minute for this API key; "
                f"retry in {wait} s",
                code="rate_limit_exceeded",
                headers={**headers, "Retry-After": str(wait)},
            )
        return headers
