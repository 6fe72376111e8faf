"""Per-key rate limits (requests/min, tokens/min) shared by every gateway replica.

A request costs one request and ``job.cost_tokens`` tokens (prompt estimate + max_tokens, as
OpenAI counts it at admission). Both limits are checked and charged in one Lua script
(``CHARGE``), all or nothing: a refused request costs nothing. Answers carry OpenAI's
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
from shared.errors import RateLimited
from shared.keys import Keys
from shared.models import Job
from shared.redis import RedisClient

WINDOW_MS = 60_000
CHARGE_TTL_MS = WINDOW_MS  # longer than any replay: redis-py gives up within seconds

# KEYS[1]: the request's charge (its stored answer); KEYS[2..]: one counter hash per limit.
# ARGV: window_ms, charge_ttl_ms, then amount and cost per limit, in KEYS order.
# Returns "<refused limit index, 0 = none>|<retry ms>|<remaining>,<reset ms>|...".
CHARGE = """
local window_ms = tonumber(ARGV[1])
local charge_ttl_ms = tonumber(ARGV[2])
local answered = redis.call('GET', KEYS[1])
if answered then return answered end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = math.floor(now / window_ms)
local into = now - cur * window_ms
local counts = {}
local refused, retry_ms = 0, 0
for i = 2, #KEYS do
  local amount, cost = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local fields = redis.call('HGETALL', KEYS[i])
  local this, prev = 0, 0
  for f = 1, #fields, 2 do
    local w = tonumber(fields[f])
    if w == cur then this = tonumber(fields[f + 1])
    elseif w == cur - 1 then prev = tonumber(fields[f + 1])
    else redis.call('HDEL', KEYS[i], fields[f]) end
  end
  local weighted = prev * (window_ms - into) / window_ms + this
  counts[i] = {amount, cost, this, prev, weighted}
  if refused == 0 and weighted + cost > amount then
    refused = i - 1
    if cost > amount then retry_ms = window_ms  -- never fits: the full minute
    elseif this + cost <= amount then  -- fits once enough of the previous minute slid out
      retry_ms = math.ceil((weighted + cost - amount) * window_ms / prev)
    else  -- fits once enough of this minute slid out of the next one
      retry_ms = window_ms - into + math.ceil((1 - (amount - cost) / this) * window_ms)
    end
  end
end
local out = {tostring(refused), tostring(retry_ms)}
for i = 2, #KEYS do
  local amount, cost, this, prev, weighted = unpack(counts[i])
  if refused == 0 then
    redis.call('HINCRBY', KEYS[i], tostring(cur), cost)
    redis.call('PEXPIRE', KEYS[i], 2 * window_ms)
    this, weighted = this + cost, weighted + cost
  end
  local reset = 0
  if this > 0 then reset = 2 * window_ms - into elseif prev > 0 then reset = window_ms - into end
  out[#out + 1] = math.max(0, math.floor(amount - weighted)) .. ',' .. reset
end
local answer = table.concat(out, '|')
redis.call('SET', KEYS[1], answer, 'PX', charge_ttl_ms)
return answer
"""


@dataclass(frozen=True, slots=True)
class Limit:
    name: str  # "requests" or "tokens": the header's suffix and the counter's name
    amount: int  # per minute
    cost: int  # what this request takes from it


class RateLimits:
    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self.redis, self.keys = redis, keys
        # EVALSHA, loaded again on NOSCRIPT (redis-py types it for ``Redis``; the cluster client
        # runs it the same way, routed by its keys)
        self.script = redis.register_script(CHARGE)  # type: ignore[misc]

    async def charge(self, key: ApiKey | None, job: Job) -> dict[str, str]:
        """Charge ``job`` to ``key``'s budgets; the headers to send, or ``RateLimited``.

        Calling it again for the same job (a replay) charges nothing and answers the same.
        """
        if key is None or not (key.rpm or key.tpm):
            return {}
        limits = [Limit("requests", key.rpm, 1)] if key.rpm else []
        limits += [Limit("tokens", key.tpm, job.cost_tokens)] if key.tpm else []
        names = [self.keys.rate_window(key.key_hash, lim.name) for lim in limits]
        args: list[int] = [WINDOW_MS, CHARGE_TTL_MS]
        for lim in limits:
            args += [lim.amount, lim.cost]
        answer = await self.script(
            keys=[self.keys.rate_charge(key.key_hash, job.id), *names], args=args
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
