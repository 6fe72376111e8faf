-- ENQUEUE: store a new job and append it to its queue. Returns the queue entry id.
-- Fairness: a tenant holds at most ``quantum`` tokens of the shared queue of a priority (one
-- job at least); the rest waits, in order, in its own deferred stream and moves in as its jobs
-- leave. A newcomer's job is thus behind at most (active tenants x quantum) tokens.
local job      = KEYS[1]  -- the job's hash (must not exist yet)
local queue    = KEYS[2]  -- the shared queue (stream) of the job's model and priority
local backlog  = KEYS[3]  -- the model's backlog hash: <priority>:tokens, <priority>:jobs
local fair     = KEYS[4]  -- the model's fairness settings hash (``quantum``)
local share    = KEYS[5]  -- tenant -> tokens it holds in ``queue`` (hash)
local deferred = KEYS[6]  -- the tenant's deferred stream of this priority
local job_id   = ARGV[1]  -- the job's id
local payload  = ARGV[2]  -- the job as JSON
local cost     = tonumber(ARGV[3])  -- its cost in tokens
local ttl      = ARGV[4]  -- ms the job's hash lives
local group    = ARGV[5]  -- the workers' consumer group
local prio     = ARGV[6]  -- its priority (high|normal|low)
local tenant   = ARGV[7]  -- its tenant, as in key names
local quantum  = tonumber(ARGV[8])  -- fair-share quantum in tokens (0: off)
local affinity = ARGV[9]  -- JSON: ``fp`` block hashes joined by spaces, ``session``, ``aw`` longest affinity wait ms (0: none), ``sttl`` session ttl ms, ``dl`` deadline ms; or ``{}``
local need     = ARGV[10] -- bit mask of the features a worker must implement to take it (shared.capabilities; 0: none)
local deadline = ARGV[11] -- its deadline, ms by Redis's clock ('': none): PULL reads it, not the payload

if redis.call('EXISTS', job) == 1 then
  -- a replay (the client retried after the reply was lost) or the same id again: the job is
  -- in already; a second entry would run it twice and count its backlog and share twice
  return redis.call('HGET', job, 'entry')
end
if redis.call('EXISTS', queue) == 0 then
  redis.call('XGROUP', 'CREATE', queue, group, '0', 'MKSTREAM')
end
redis.call('HSET', fair, 'quantum', quantum)
local in_main = tonumber(redis.call('HGET', share, tenant) or '0')
local into, entry, inmain = queue, nil, 1
if quantum <= 0 or in_main == 0 or in_main + cost <= quantum then
  entry = redis.call('XADD', queue, '*', 'job', job_id, 'cost', cost, 'tenant', tenant)
  redis.call('HINCRBY', share, tenant, cost)
else
  into = deferred
  entry = redis.call('XADD', deferred, '*', 'job', job_id, 'cost', cost)
  inmain = 0
end
redis.call('HSET', job, 'id', job_id, 'state', 'queued', 'payload', payload, 'seq', 0,
  'fence', 0, 'deliveries', 0, 'ntok', 0, 'queue', into, 'entry', entry, 'cost', cost,
  'prio', prio, 'tenant', tenant, 'inmain', inmain, 'deadline', deadline)
local aff = cjson.decode(affinity)
if aff['aw'] and tonumber(aff['aw']) > 0 then
  redis.call('HSET', job, 'aw', aff['aw'], 'fp', aff['fp'] or '', 'session', aff['session'] or '',
    'sttl', aff['sttl'] or 0, 'dl', aff['dl'] or 0)
end
if tonumber(need or '0') > 0 then redis.call('HSET', job, 'need', need) end
redis.call('PEXPIRE', job, ttl)
redis.call('HINCRBY', backlog, prio .. ':tokens', cost)
redis.call('HINCRBY', backlog, prio .. ':jobs', 1)
return entry
