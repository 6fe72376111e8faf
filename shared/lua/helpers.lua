-- Helpers of the scripts that move jobs between states. shared/scripts.py puts them before
-- such a script, and before them the table ``K`` of key names (shared/keys.py LUA_NAMES).
-- ``m`` is the model's keys, as the script got them through KEYS: ``m.prefix`` (the model's
-- ``slip:{model}:``, for the keys found only at run time, built with ``K``), ``m.leases``,
-- ``m.reserved``, ``m.backlog`` and ``m.fair`` (the ones the script's calls need).
local function emit(log, channel, batch, ttl)
  redis.call('XADD', log, '*', 'e', batch)
  redis.call('PEXPIRE', log, ttl)
  redis.call('SPUBLISH', channel, batch)
end
local function error_batch(seq, code, message, status)
  return cjson.encode({v=1, events={{t='error', s=seq, code=code, message=message, status=status}}})
end
local function promote(m, prio, tenant)
  -- move the tenant's deferred jobs into the shared queue while it is under its quantum
  local share, main = m.prefix .. K.share .. prio, m.prefix .. K.queue .. prio
  local deferred = m.prefix .. K.deferred .. prio .. K.part .. tenant
  local quantum = tonumber(redis.call('HGET', m.fair, 'quantum') or '0')
  local in_main = tonumber(redis.call('HGET', share, tenant) or '0')
  while true do
    local head = redis.call('XRANGE', deferred, '-', '+', 'COUNT', 1)
    if #head == 0 then break end
    local f = {}
    for k = 1, #head[1][2], 2 do f[head[1][2][k]] = head[1][2][k + 1] end
    local cost = tonumber(f['cost'])
    if in_main > 0 and in_main + cost > quantum then break end
    redis.call('XDEL', deferred, head[1][1])
    local job = m.prefix .. K.job .. f['job']
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
local function unreserve(m, job)
  -- a queued job reserved for a warm worker stops being reserved (claimed or cancelled)
  local target = redis.call('HGET', job, 'rsv')
  if not target then return end
  local id = redis.call('HGET', job, 'id')
  redis.call('HDEL', job, 'rsv')
  redis.call('ZREM', m.prefix .. K.inbox .. target, id)
  redis.call('ZREM', m.reserved, id)
  local wk = m.prefix .. K.worker .. target
  if redis.call('EXISTS', wk) == 1 then
    redis.call('HINCRBY', wk, 'rtok', -tonumber(redis.call('HGET', job, 'cost')))
    redis.call('HINCRBY', wk, 'rjobs', -1)
  end
end
local function unqueue(m, job)
  -- the job leaves state 'queued': take its cost off the model's backlog and, when it was in
  -- the shared queue, off its tenant's share there (which may let a deferred job in)
  unreserve(m, job)
  local f = redis.call('HMGET', job, 'prio', 'cost', 'tenant', 'inmain')
  local prio, cost, tenant = f[1], f[2], f[3]
  if prio and cost then
    redis.call('HINCRBY', m.backlog, prio .. ':tokens', -tonumber(cost))
    redis.call('HINCRBY', m.backlog, prio .. ':jobs', -1)
    if tenant and f[4] == '1' then
      redis.call('HSET', job, 'inmain', 0)
      redis.call('HINCRBY', m.prefix .. K.share .. prio, tenant, -tonumber(cost))
      promote(m, prio, tenant)
    end
  end
end
local function job_of(m, id)
  -- the keys of a job found at run time (an id from a queue or a set): hash, log, channel
  local key = m.prefix .. K.job .. id
  return {id = id, key = key, log = key .. K.job_log, channel = key .. K.job_events}
end
local function finish(m, j, state, group)
  -- terminal: record the state, drop the queue entry (acked first) and the lease
  redis.call('HSET', j.key, 'state', state)
  local q, entry = redis.call('HGET', j.key, 'queue'), redis.call('HGET', j.key, 'entry')
  if q and entry then
    pcall(redis.call, 'XACK', q, group, entry)  -- a deferred stream has no group
    redis.call('XDEL', q, entry)
  end
  redis.call('ZREM', m.leases, j.id)
end
local function fail(m, j, state, code, message, status, group, ttl)
  -- terminal with an error event (``j``: a job's keys, as ``job_of`` returns them)
  local seq = tonumber(redis.call('HGET', j.key, 'seq')) + 1
  redis.call('HSET', j.key, 'seq', seq)
  emit(j.log, j.channel, error_batch(seq, code, message, status), ttl)
  finish(m, j, state, group)
end
local function claim(m, job, id, consumer, now, lease)
  local fence = redis.call('HINCRBY', job, 'fence', 1)
  redis.call('HINCRBY', job, 'deliveries', 1)
  redis.call('HSET', job, 'state', 'running', 'owner', consumer, 'lease_until', now + lease)
  redis.call('ZADD', m.leases, now + lease, id)
  local f = redis.call('HMGET', job, 'payload', 'seq', 'ntok')
  return {'job', id, f[1], fence, f[2], f[3]}
end
local function past_deadline(job, now)
  -- the deadline ENQUEUE recorded ('': none); a job queued by a gateway from before that field
  -- has only its payload to say it, and decoding the payload costs Redis more the longer the
  -- prompt (a PULL of a job with a 32,000-character prompt took 413 us instead of 178)
  local deadline = redis.call('HGET', job, 'deadline')
  if not deadline then
    deadline = cjson.decode(redis.call('HGET', job, 'payload'))['deadline_at_ms']
    if deadline == cjson.null or deadline == nil then return false end
  elseif deadline == '' then
    return false
  end
  return tonumber(deadline) <= now
end
