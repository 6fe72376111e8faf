-- SWEEP (the janitor): expired leases nobody took over. Drop stale entries (the job already
-- ended) and expire jobs whose deadline passed, so their clients get an answer even while no
-- worker has room. Jobs still within their deadline stay for a worker's takeover. Returns
-- the swept job ids.
local leases = KEYS[1]  -- the model's leases (sorted set)
local prefix = ARGV[1]  -- the model's key prefix ``slip:{model}:`` (the jobs' keys)
local group  = ARGV[2]  -- the workers' consumer group
local ttl    = tonumber(ARGV[3])  -- ms an expired job's log lives from now

local m, now = {prefix = prefix, leases = leases}, redis_now()
local swept = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 100)) do
  local j = job_of(m, id)
  if redis.call('HGET', j.key, 'state') ~= 'running' then
    redis.call('ZREM', leases, id)
    swept[#swept + 1] = id
  elseif past_deadline(j.key, now) then
    fail(m, j, 'expired', 'deadline_exceeded', 'the deadline passed while the job waited for a worker to take it over', 504, group, ttl)
    swept[#swept + 1] = id
  end
end
return swept
