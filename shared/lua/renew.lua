-- RENEW: extend the leases of the jobs a worker runs. A lease ends ``lease_ms`` after now by
-- Redis's clock. Returns one 1/0 per job: 0 means the lease is lost (fenced, cancelled or
-- finished). A replay only sets the same leases again (ending a few ms later): nothing is
-- counted.
local leases    = KEYS[1]  -- the model's leases (sorted set)
local jobs      = {unpack(KEYS, 2)}  -- the jobs' hashes
local lease_ms  = tonumber(ARGV[1])  -- how long a lease lasts from now
local id_fences = {unpack(ARGV, 2)}  -- (job id, fence) pairs, in the order of ``jobs``

local t = redis.call('TIME')
local lease_until = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + lease_ms
local out = {}
for i, job in ipairs(jobs) do
  local id, fence = id_fences[2 * i - 1], id_fences[2 * i]
  if redis.call('HGET', job, 'fence') == fence and redis.call('HGET', job, 'state') == 'running' then
    redis.call('HSET', job, 'lease_until', lease_until)
    redis.call('ZADD', leases, 'XX', lease_until, id)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
