-- HANDBACK: a draining worker gives a job back for immediate takeover (its lease ends now,
-- and the delivery does not count towards the poison limit). Returns 1, or 0 if no longer
-- ours. ``handback`` records the fence handed back: a replay returns 1 again and changes
-- nothing (the delivery is taken off once, the wake stream pinged once), even after a takeover.
local job    = KEYS[1]  -- the job's hash
local leases = KEYS[2]  -- the model's leases (sorted set)
local wake   = KEYS[3]  -- the model's wake stream (idle workers block on it)
local fence  = ARGV[1]  -- the fence of the worker's claim
local job_id = ARGV[2]  -- the job's id

if redis.call('HGET', job, 'handback') == fence then return 1 end
if redis.call('HGET', job, 'fence') ~= fence or redis.call('HGET', job, 'state') ~= 'running' then
  return 0
end
redis.call('HSET', job, 'lease_until', 0, 'handback', fence)
redis.call('HINCRBY', job, 'deliveries', -1)
redis.call('ZADD', leases, 0, job_id)
redis.call('XADD', wake, 'MAXLEN', '~', 100, '*', 'handback', job_id)
return 1
