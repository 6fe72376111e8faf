"""Lua scripts that move a job between states atomically (``PULL`` and ``RELEASE``, which
choose what a worker takes, are in ``shared/lua_pull.py``).

Every script touches keys of one model only. They share the ``{model}`` hash tag, so the
scripts run on Redis Cluster too; keys inside a script are derived from the model prefix
(``slip:{model}:``, the same tag), which keeps "look at the queue head, then claim it" atomic.

Job states: queued -> running -> completed | failed; queued|running -> cancelled | expired.
``fence`` grows on every claim; a write must carry the current fence (zombie fencing).
``leases`` (a sorted set, score = lease end in ms) is how expired jobs are found for takeover.
"""

# Shared helpers prepended to the scripts.
_HELPERS = r"""
local function emit(log, channel, batch, ttl)
  redis.call('XADD', log, '*', 'e', batch)
  redis.call('PEXPIRE', log, ttl)
  redis.call('PUBLISH', channel, batch)
end
local function error_batch(seq, code, message, status)
  return cjson.encode({v=1, events={{t='error', s=seq, code=code, message=message, status=status}}})
end
local function promote(mp, prio, tenant)
  -- move the tenant's deferred jobs into the shared queue while it is under its quantum
  local share, main = mp .. 'share:' .. prio, mp .. 'queue:' .. prio
  local deferred = mp .. 'deferred:' .. prio .. ':' .. tenant
  local quantum = tonumber(redis.call('HGET', mp .. 'fair', 'quantum') or '0')
  local in_main = tonumber(redis.call('HGET', share, tenant) or '0')
  while true do
    local head = redis.call('XRANGE', deferred, '-', '+', 'COUNT', 1)
    if #head == 0 then break end
    local f = {}
    for k = 1, #head[1][2], 2 do f[head[1][2][k]] = head[1][2][k + 1] end
    local cost = tonumber(f['cost'])
    if in_main > 0 and in_main + cost > quantum then break end
    redis.call('XDEL', deferred, head[1][1])
    local job = mp .. 'job:' .. f['job']
    if redis.call('HGET', job, 'state') == 'queued' then
      local entry = redis.call('XADD', main, '*', 'job', f['job'], 'cost', cost, 'tenant', tenant)
      redis.call('HSET', job, 'queue', main, 'entry', entry, 'inmain', 1)
      in_main = in_main + cost
    end
  end
  if in_main > 0 then redis.call('HSET', share, tenant, in_main) else redis.call('HDEL', share, tenant) end
end
local function redis_now()
  -- Redis's clock, never a host's: every time-based decision in the scripts uses it
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function unreserve(mp, job)
  -- a queued job reserved for a warm worker stops being reserved (claimed or cancelled)
  local target = redis.call('HGET', job, 'rsv')
  if not target then return end
  local id = redis.call('HGET', job, 'id')
  redis.call('HDEL', job, 'rsv')
  redis.call('ZREM', mp .. 'inbox:' .. target, id)
  redis.call('ZREM', mp .. 'reserved', id)
  local wk = mp .. 'worker:' .. target
  if redis.call('EXISTS', wk) == 1 then
    redis.call('HINCRBY', wk, 'rtok', -tonumber(redis.call('HGET', job, 'cost')))
    redis.call('HINCRBY', wk, 'rjobs', -1)
  end
end
local function unqueue(mp, job)
  -- the job leaves state 'queued': take its cost off the model's backlog and, when it was in
  -- the shared queue, off its tenant's share there (which may let a deferred job in)
  unreserve(mp, job)
  local prio, cost = redis.call('HGET', job, 'prio'), redis.call('HGET', job, 'cost')
  if prio and cost then
    redis.call('HINCRBY', mp .. 'backlog', prio .. ':tokens', -tonumber(cost))
    redis.call('HINCRBY', mp .. 'backlog', prio .. ':jobs', -1)
    local tenant = redis.call('HGET', job, 'tenant')
    if tenant and redis.call('HGET', job, 'inmain') == '1' then
      redis.call('HSET', job, 'inmain', 0)
      redis.call('HINCRBY', mp .. 'share:' .. prio, tenant, -tonumber(cost))
      promote(mp, prio, tenant)
    end
  end
end
local function finish(mp, id, state, group)
  -- terminal: record the state, drop the queue entry (acked first) and the lease
  local job = mp .. 'job:' .. id
  redis.call('HSET', job, 'state', state)
  local q, entry = redis.call('HGET', job, 'queue'), redis.call('HGET', job, 'entry')
  if q and entry then
    pcall(redis.call, 'XACK', q, group, entry)  -- a deferred stream has no group
    redis.call('XDEL', q, entry)
  end
  redis.call('ZREM', mp .. 'leases', id)
end
local function fail(mp, id, state, code, message, status, group, ttl)
  local job = mp .. 'job:' .. id
  local seq = tonumber(redis.call('HGET', job, 'seq')) + 1
  redis.call('HSET', job, 'seq', seq)
  emit(job .. ':log', job .. ':events', error_batch(seq, code, message, status), ttl)
  finish(mp, id, state, group)
end
local function claim(mp, id, consumer, now, lease)
  local job = mp .. 'job:' .. id
  local fence = redis.call('HINCRBY', job, 'fence', 1)
  redis.call('HINCRBY', job, 'deliveries', 1)
  redis.call('HSET', job, 'state', 'running', 'owner', consumer, 'lease_until', now + lease)
  redis.call('ZADD', mp .. 'leases', now + lease, id)
  return {'job', id, redis.call('HGET', job, 'payload'), fence, redis.call('HGET', job, 'seq'),
          redis.call('HGET', job, 'ntok')}
end
local function past_deadline(job, now)
  local deadline = cjson.decode(redis.call('HGET', job, 'payload'))['deadline_at_ms']
  return deadline ~= cjson.null and deadline ~= nil and tonumber(deadline) <= now
end
"""

# KEYS: job hash, queue stream, backlog hash.
# ARGV: job id, payload, cost, ttl ms, group, priority, tenant, fair-share quantum (tokens,
#       0 = off), model prefix, affinity (JSON: ``fp`` block hashes joined by spaces,
#       ``session``, ``aw`` longest affinity wait ms (0 = none), ``sttl`` session ttl ms,
#       ``dl`` deadline ms; or ``{}``), need (bit mask of the features a worker must
#       implement to take the job, ``shared.capabilities``; 0 or absent: none).
# Fairness: a tenant holds at most ``quantum`` tokens of the shared queue of a priority (one
# job at least); the rest waits, in order, in its own deferred stream and moves in as its jobs
# leave. A newcomer's job is thus behind at most (active tenants x quantum) tokens.
ENQUEUE = (
    r"""
"""
    + _HELPERS
    + r"""
local mp, cost, tenant, quantum = ARGV[9], tonumber(ARGV[3]), ARGV[7], tonumber(ARGV[8])
if redis.call('EXISTS', KEYS[1]) == 1 then
  -- a replay (the client retried after the reply was lost) or the same id again: the job is
  -- in already; a second entry would run it twice and count its backlog and share twice
  return redis.call('HGET', KEYS[1], 'entry')
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[5], '0', 'MKSTREAM')
end
redis.call('HSET', mp .. 'fair', 'quantum', quantum)
local share = mp .. 'share:' .. ARGV[6]
local in_main = tonumber(redis.call('HGET', share, tenant) or '0')
local queue, entry, inmain = KEYS[2], nil, 1
if quantum <= 0 or in_main == 0 or in_main + cost <= quantum then
  entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[1], 'cost', cost, 'tenant', tenant)
  redis.call('HINCRBY', share, tenant, cost)
else
  queue = mp .. 'deferred:' .. ARGV[6] .. ':' .. tenant
  entry = redis.call('XADD', queue, '*', 'job', ARGV[1], 'cost', cost)
  inmain = 0
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'state', 'queued', 'payload', ARGV[2], 'seq', 0,
  'fence', 0, 'deliveries', 0, 'ntok', 0, 'queue', queue, 'entry', entry, 'cost', cost,
  'prio', ARGV[6], 'tenant', tenant, 'inmain', inmain)
local aff = cjson.decode(ARGV[10])
if aff['aw'] and tonumber(aff['aw']) > 0 then
  redis.call('HSET', KEYS[1], 'aw', aff['aw'], 'fp', aff['fp'] or '', 'session', aff['session'] or '',
    'sttl', aff['sttl'] or 0, 'dl', aff['dl'] or 0)
end
if tonumber(ARGV[11] or '0') > 0 then redis.call('HSET', KEYS[1], 'need', ARGV[11]) end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('HINCRBY', KEYS[3], ARGV[6] .. ':tokens', ARGV[3])
redis.call('HINCRBY', KEYS[3], ARGV[6] .. ':jobs', 1)
return entry
"""
)

# KEYS: job hash, job log.
# ARGV: fence, channel, batch JSON, last seq, new tokens, ttl ms, terminal state or '', group,
#       model prefix, job id, the job's seq before this batch (the batch's first numbered
#       event is the next one).
# Returns 1 when written; 2 when this very write was applied already (a replay: the client
# retried after the reply was lost; nothing is appended again); 0 when fenced off (lease lost,
# job cancelled or finished); -1 when the batch does not start at the job's next sequence
# number (nothing written). ``lastw`` = "fence:last seq" of the job's latest write names it:
# within one fence every write ends at a higher seq (only a first, ``started``-only batch ends
# at the claim's seq), so a replay is recognised even after its terminal write ended the job.
EMIT = (
    _HELPERS
    + r"""
local f = redis.call('HMGET', KEYS[1], 'fence', 'state', 'seq', 'lastw')
local mark = ARGV[1] .. ':' .. ARGV[4]
if f[1] == ARGV[1] and f[4] == mark then return 2 end
if f[1] ~= ARGV[1] or f[2] ~= 'running' then return 0 end
if tonumber(f[3]) ~= tonumber(ARGV[11]) then return -1 end
emit(KEYS[2], ARGV[2], ARGV[3], tonumber(ARGV[6]))
redis.call('HSET', KEYS[1], 'seq', ARGV[4], 'lastw', mark)
redis.call('HINCRBY', KEYS[1], 'ntok', ARGV[5])
if ARGV[7] ~= '' then finish(ARGV[9], ARGV[10], ARGV[7], ARGV[8]) end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
"""
)

# KEYS: job hash.
# ARGV: model prefix, job id, new state (cancelled|expired|failed), code, message, status,
#       ttl ms, group, control channel.
# Returns the state the job is in afterwards ('missing' when there is no such job). A replay
# finds the job terminal: it changes nothing and returns the same state.
CANCEL = (
    _HELPERS
    + r"""
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state ~= 'queued' and state ~= 'running' then return state end
if state == 'queued' then unqueue(ARGV[1], KEYS[1]) end
fail(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[8], tonumber(ARGV[7]))
if state == 'running' then redis.call('PUBLISH', ARGV[9], 'cancel ' .. ARGV[2]) end
return ARGV[3]
"""
)

# KEYS: the leases set, then job hashes.  ARGV: lease ms, then (job id, fence) pairs.
# The lease ends ``lease ms`` after now by Redis's clock. Returns one 1/0 per job: 0 means the
# lease is lost (fenced, cancelled or finished). A replay only sets the same leases again
# (ending a few ms later): nothing is counted.
RENEW = r"""
local t = redis.call('TIME')
local lease_until = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local out = {}
for i = 2, #KEYS do
  local id, fence = ARGV[2 * i - 2], ARGV[2 * i - 1]
  if redis.call('HGET', KEYS[i], 'fence') == fence and redis.call('HGET', KEYS[i], 'state') == 'running' then
    redis.call('HSET', KEYS[i], 'lease_until', lease_until)
    redis.call('ZADD', KEYS[1], 'XX', lease_until, id)
    out[i - 1] = 1
  else
    out[i - 1] = 0
  end
end
return out
"""

# KEYS: job hash, leases set, wake stream.  ARGV: fence, job id.
# A draining worker gives a job back for immediate takeover (its lease ends now, and the
# delivery does not count towards the poison limit). Returns 1, or 0 if no longer ours.
# ``handback`` records the fence handed back: a replay returns 1 again and changes nothing
# (the delivery is taken off once, the wake stream pinged once), even after a takeover.
HANDBACK = r"""
if redis.call('HGET', KEYS[1], 'handback') == ARGV[1] then return 1 end
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  return 0
end
redis.call('HSET', KEYS[1], 'lease_until', 0, 'handback', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'deliveries', -1)
redis.call('ZADD', KEYS[2], 0, ARGV[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100, '*', 'handback', ARGV[2])
return 1
"""

# KEYS: none (one model's keys, derived).  ARGV: model prefix, (unused), group, ttl ms.
# Expired leases nobody took over: drop stale entries (the job already ended) and expire jobs
# whose deadline passed, so their clients get an answer even while no worker has room.
# Jobs still within their deadline stay for a worker's takeover. Returns the swept job ids.
SWEEP = (
    _HELPERS
    + r"""
local mp, now, group, ttl = ARGV[1], redis_now(), ARGV[3], tonumber(ARGV[4])
local swept = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', mp .. 'leases', '-inf', now, 'LIMIT', 0, 100)) do
  local job = mp .. 'job:' .. id
  if redis.call('HGET', job, 'state') ~= 'running' then
    redis.call('ZREM', mp .. 'leases', id)
    swept[#swept + 1] = id
  elseif past_deadline(job, now) then
    fail(mp, id, 'expired', 'deadline_exceeded', 'the deadline passed while the job waited for a worker to take it over', 504, group, ttl)
    swept[#swept + 1] = id
  end
end
return swept
"""
)
