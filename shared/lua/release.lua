-- RELEASE: a worker leaving (drain, stop). Its reservations end now (anyone may take them),
-- it stops being a routing target, and its advertisement goes. Returns the number of jobs
-- released.
local inbox    = KEYS[1]  -- the jobs reserved for the worker (sorted set)
local reserved = KEYS[2]  -- the model's reservations (sorted set: job id by end of its wait)
local worker   = KEYS[3]  -- the worker's hash (free tokens and slots, reservations)
local warm     = KEYS[4]  -- the prefix blocks the worker holds warm (set)
local members  = KEYS[5]  -- the model's workers that may hold warm state (set)
local wake     = KEYS[6]  -- the model's wake stream (idle workers block on it)
local w        = ARGV[1]  -- the worker's id

local ids = redis.call('ZRANGE', inbox, 0, -1)
for _, id in ipairs(ids) do redis.call('ZADD', reserved, 'XX', 0, id) end
redis.call('DEL', worker, warm)
redis.call('SREM', members, w)
if #ids > 0 then redis.call('XADD', wake, 'MAXLEN', '~', 100, '*', 'released', w) end
return #ids
