"""The helpers ``PULL`` and ``RELEASE`` (``shared/lua_pull.py``) still share, until they move
to ``shared/lua/`` like the other scripts (``shared/scripts.py`` loads those).

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
