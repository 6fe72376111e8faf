-- CHARGE: an API key's rate limits (gateway/ratelimit.py), checked and charged all or nothing
-- on Redis's clock; keyed by the request, so a replay returns the stored answer.
-- Returns "<refused limit, 1-based; 0 = none>|<retry ms>|<remaining>,<reset ms>|..." (one
-- pair per limit, in windows' order).
local charge = KEYS[1]  -- string: this request's answer, kept charge_ttl_ms for replays
local windows = {unpack(KEYS, 2)}  -- one sliding-window counter hash per limit
local window_ms = tonumber(ARGV[1])  -- the window (a minute)
local charge_ttl_ms = tonumber(ARGV[2])  -- how long the answer is kept
local limits = {unpack(ARGV, 3)}  -- amount and cost per limit, in windows' order
local answered = redis.call('GET', charge)
if answered then return answered end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = math.floor(now / window_ms)
local into = now - cur * window_ms
local counts = {}
local refused, retry_ms = 0, 0
for i = 1, #windows do
  local amount, cost = tonumber(limits[2 * i - 1]), tonumber(limits[2 * i])
  local fields = redis.call('HGETALL', windows[i])
  local this, prev = 0, 0
  for f = 1, #fields, 2 do
    local w = tonumber(fields[f])
    if w == cur then this = tonumber(fields[f + 1])
    elseif w == cur - 1 then prev = tonumber(fields[f + 1])
    else redis.call('HDEL', windows[i], fields[f]) end
  end
  local weighted = prev * (window_ms - into) / window_ms + this
  counts[i] = {amount, cost, this, prev, weighted}
  if refused == 0 and weighted + cost > amount then
    refused = i
    if cost > amount then retry_ms = window_ms  -- never fits: the full minute
    elseif this + cost <= amount then  -- fits once enough of the previous minute slid out
      retry_ms = math.ceil((weighted + cost - amount) * window_ms / prev)
    else  -- fits once enough of this minute slid out of the next one
      retry_ms = window_ms - into + math.ceil((1 - (amount - cost) / this) * window_ms)
    end
  end
end
local out = {tostring(refused), tostring(retry_ms)}
for i = 1, #windows do
  local amount, cost, this, prev, weighted = unpack(counts[i])
  if refused == 0 then
    redis.call('HINCRBY', windows[i], tostring(cur), cost)
    redis.call('PEXPIRE', windows[i], 2 * window_ms)
    this, weighted = this + cost, weighted + cost
  end
  local reset = 0
  if this > 0 then reset = 2 * window_ms - into elseif prev > 0 then reset = window_ms - into end
  out[#out + 1] = math.max(0, math.floor(amount - weighted)) .. ',' .. reset
end
local answer = table.concat(out, '|')
redis.call('SET', charge, answer, 'PX', charge_ttl_ms)
return answer
