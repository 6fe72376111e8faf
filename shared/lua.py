"""Lua scripts that move a job between states atomically.

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
local function unqueue(mp, job)
  -- the job leaves state 'queued': take its cost off the model's backlog and, when it was in
  -- the shared queue, off its tenant's share there (which may let a deferred job in)
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
#       0 = off), model prefix.
# Fairness: a tenant holds at most ``quantum`` tokens of the shared queue of a priority (one
# job at least); the rest waits, in order, in its own deferred stream and moves in as its jobs
# leave. A newcomer's job is thus behind at most (active tenants x quantum) tokens.
ENQUEUE = (
    r"""
"""
    + _HELPERS
    + r"""
local mp, cost, tenant, quantum = ARGV[9], tonumber(ARGV[3]), ARGV[7], tonumber(ARGV[8])
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
redis.call('HSET', KEYS[1], 'state', 'queued', 'payload', ARGV[2], 'seq', 0, 'fence', 0,
  'deliveries', 0, 'ntok', 0, 'queue', queue, 'entry', entry, 'cost', cost, 'prio', ARGV[6],
  'tenant', tenant, 'inmain', inmain)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('HINCRBY', KEYS[3], ARGV[6] .. ':tokens', ARGV[3])
redis.call('HINCRBY', KEYS[3], ARGV[6] .. ':jobs', 1)
return entry
"""
)

# KEYS: the model's queues (highest priority first), then its wake stream.
# ARGV: group, consumer, now ms, free tokens, idle (1/0), model prefix, lease ms, ttl ms,
#       max deliveries, then one aging bound (ms) per queue (0 = never promoted).
# Order: an expired lease (takeover) first, then queue heads by priority with aging.
# Returns {'empty', ms until the next lease expires or -1, last ids...} | {'full'}
#       | {'skipped', job id, state} | {'job', job id, payload, fence, seq, ntok[, marks]}
# where a job from a queue carries the 'empty' reply's marks when nothing else is waiting.
PULL = (
    _HELPERS
    + r"""
local group, consumer = ARGV[1], ARGV[2]
local now, free, idle = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5] == '1'
local mp, lease, ttl, max_deliveries = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local nq = #KEYS - 1

local expired = redis.call('ZRANGEBYSCORE', mp .. 'leases', '-inf', now, 'LIMIT', 0, 1)
if #expired > 0 then
  local id = expired[1]
  local job = mp .. 'job:' .. id
  local state = redis.call('HGET', job, 'state')
  if state ~= 'running' then
    redis.call('ZREM', mp .. 'leases', id)
    return {'skipped', id, tostring(state)}
  end
  if not idle and tonumber(redis.call('HGET', job, 'cost')) > free then return {'full'} end
  if tonumber(redis.call('HGET', job, 'deliveries')) >= max_deliveries then
    redis.call('XADD', mp .. 'dead', 'MAXLEN', '~', 10000, '*', 'job', id,
      'deliveries', redis.call('HGET', job, 'deliveries'), 'owner', tostring(redis.call('HGET', job, 'owner')))
    fail(mp, id, 'failed', 'poison_job', 'the job failed on ' .. max_deliveries .. ' workers; it was moved to the dead-letter stream', 500, group, ttl)
    return {'skipped', id, 'dead'}
  end
  if past_deadline(job, now) then
    fail(mp, id, 'expired', 'deadline_exceeded', 'the deadline passed during a worker failover', 504, group, ttl)
    return {'skipped', id, 'expired'}
  end
  local q, entry = redis.call('HGET', job, 'queue'), redis.call('HGET', job, 'entry')
  redis.call('XCLAIM', q, group, consumer, 0, entry, 'JUSTID')
  return claim(mp, id, consumer, now, lease)
end

-- the first entry of queue q not yet delivered to the group (nil when there is none)
local function head_of(q)
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', q)
  if not ok or #groups == 0 then
    redis.call('XGROUP', 'CREATE', q, group, '0', 'MKSTREAM')
    groups = redis.call('XINFO', 'GROUPS', q)
  end
  local delivered = '0-0'
  for _, g in ipairs(groups) do
    local info = {}
    for k = 1, #g, 2 do info[g[k]] = g[k + 1] end
    if info['name'] == group then delivered = info['last-delivered-id'] end
  end
  return redis.call('XRANGE', q, '(' .. delivered, '+', 'COUNT', 1)[1]
end

-- what an idle worker blocks on: ms until the next lease expires (or -1), then the last id
-- of every queue and of the wake stream
local function idle_marks(out)
  out[#out + 1] = -1
  local next_lease = redis.call('ZRANGE', mp .. 'leases', 0, 0, 'WITHSCORES')
  if #next_lease > 0 then out[#out] = math.max(0, tonumber(next_lease[2]) - now) end
  for i = 1, #KEYS do
    local ok, info = pcall(redis.call, 'XINFO', 'STREAM', KEYS[i])
    local last = '0-0'
    if ok then
      for k = 1, #info, 2 do if info[k] == 'last-generated-id' then last = info[k + 1] end end
    end
    out[#out + 1] = last
  end
  return out
end

local best, best_rank, best_age, heads = nil, nil, nil, 0
for i = 1, nq do
  local q = KEYS[i]
  local head = head_of(q)
  if head then
    heads = heads + 1
    local age = now - tonumber(string.match(head[1], '^(%d+)'))
    local aging = tonumber(ARGV[9 + i])
    local rank = i
    if aging > 0 and age >= aging then rank = 0 end
    if best == nil or rank < best_rank or (rank == 0 and best_rank == 0 and age > best_age) then
      best, best_rank, best_age = {q, head}, rank, age
    end
  end
end

if best == nil then return idle_marks({'empty'}) end

local fields = {}
for k = 1, #best[2][2], 2 do fields[best[2][2][k]] = best[2][2][k + 1] end
if not idle and tonumber(fields['cost']) > free then return {'full'} end
redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', best[1], '>')
local id = fields['job']
local job = mp .. 'job:' .. id
local state = redis.call('HGET', job, 'state')
if state ~= 'queued' then
  redis.call('XACK', best[1], group, best[2][1])
  redis.call('XDEL', best[1], best[2][1])
  return {'skipped', id, tostring(state)}
end
unqueue(mp, job)
if past_deadline(job, now) then
  fail(mp, id, 'expired', 'deadline_exceeded', 'the deadline passed while the job was queued', 504, group, ttl)
  return {'skipped', id, 'expired'}
end
local out = claim(mp, id, consumer, now, lease)
-- another queue had a head, or this one has a next entry (maybe a tenant's deferred job
-- that unqueue just moved in): more is waiting
if heads > 1 or head_of(best[1]) then return out end
-- nothing else is waiting: the worker may block on these marks instead of pulling again
return idle_marks(out)
"""
)

# KEYS: job hash, job log.
# ARGV: fence, channel, batch JSON, last seq, new tokens, ttl ms, terminal state or '', group,
#       model prefix, job id.
# Returns 1, or 0 when the write is fenced off (lease lost, job cancelled or finished).
EMIT = (
    _HELPERS
    + r"""
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  return 0
end
emit(KEYS[2], ARGV[2], ARGV[3], tonumber(ARGV[6]))
redis.call('HSET', KEYS[1], 'seq', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'ntok', ARGV[5])
if ARGV[7] ~= '' then finish(ARGV[9], ARGV[10], ARGV[7], ARGV[8]) end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
"""
)

# KEYS: job hash.
# ARGV: model prefix, job id, new state (cancelled|expired|failed), code, message, status,
#       ttl ms, group, control channel.
# Returns the state the job is in afterwards ('missing' when there is no such job).
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

# KEYS: the leases set, then job hashes.  ARGV: lease-until ms, then (job id, fence) pairs.
# Returns one 1/0 per job: 0 means the lease is lost (fenced, cancelled or finished).
RENEW = r"""
local out = {}
for i = 2, #KEYS do
  local id, fence = ARGV[2 * i - 2], ARGV[2 * i - 1]
  if redis.call('HGET', KEYS[i], 'fence') == fence and redis.call('HGET', KEYS[i], 'state') == 'running' then
    redis.call('HSET', KEYS[i], 'lease_until', ARGV[1])
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], id)
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
HANDBACK = r"""
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  return 0
end
redis.call('HSET', KEYS[1], 'lease_until', 0)
redis.call('HINCRBY', KEYS[1], 'deliveries', -1)
redis.call('ZADD', KEYS[2], 0, ARGV[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100, '*', 'handback', ARGV[2])
return 1
"""

# KEYS: none (one model's keys, derived).  ARGV: model prefix, now ms, group, ttl ms.
# Expired leases nobody took over: drop stale entries (the job already ended) and expire jobs
# whose deadline passed, so their clients get an answer even while no worker has room.
# Jobs still within their deadline stay for a worker's takeover. Returns the swept job ids.
SWEEP = (
    _HELPERS
    + r"""
local mp, now, group, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
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
