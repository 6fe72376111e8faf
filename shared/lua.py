"""Lua scripts that move a job between states atomically.

Each script touches keys of one model only (they share the ``{model}`` hash tag), so they run
on Redis Cluster too. Job keys are derived inside the scripts from ``job_prefix`` (always the
same tagged prefix), which keeps the queue-head peek and the claim in one atomic step.
"""

# Shared helpers prepended to every script.
_HELPERS = r"""
local function emit(log, channel, batch, ttl)
  redis.call('XADD', log, '*', 'e', batch)
  redis.call('PEXPIRE', log, ttl)
  redis.call('PUBLISH', channel, batch)
end
local function error_batch(seq, code, message, status)
  return cjson.encode({v=1, events={{t='error', s=seq, code=code, message=message, status=status}}})
end
local function unqueue(job)
  -- the job leaves state 'queued': take its cost off the model's backlog
  local backlog = string.gsub(job, ':job:.*$', ':backlog')
  local prio, cost = redis.call('HGET', job, 'prio'), redis.call('HGET', job, 'cost')
  if prio and cost then
    redis.call('HINCRBY', backlog, prio .. ':tokens', -tonumber(cost))
    redis.call('HINCRBY', backlog, prio .. ':jobs', -1)
  end
end
local function finish_entry(job, group)
  local q = redis.call('HGET', job, 'queue')
  local entry = redis.call('HGET', job, 'entry')
  if q and entry then
    redis.call('XACK', q, group, entry)
    redis.call('XDEL', q, entry)
  end
end
"""

# KEYS: job hash, queue stream, backlog hash.  ARGV: job id, payload, cost, ttl ms, group, priority.
ENQUEUE = r"""
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[5], '0', 'MKSTREAM')
end
local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[1], 'cost', ARGV[3])
redis.call('HSET', KEYS[1], 'state', 'queued', 'payload', ARGV[2], 'seq', 0, 'fence', 0,
  'deliveries', 0, 'ntok', 0, 'queue', KEYS[2], 'entry', entry, 'cost', ARGV[3], 'prio', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('HINCRBY', KEYS[3], ARGV[6] .. ':tokens', ARGV[3])
redis.call('HINCRBY', KEYS[3], ARGV[6] .. ':jobs', 1)
return entry
"""

# KEYS: the model's queues, highest priority first.
# ARGV: group, consumer, now ms, free tokens, idle (1/0), job key prefix, lease ms, ttl ms,
#       then one aging bound (ms) per queue (0 = never promoted).
# Returns {'empty', last ids...} | {'full'} | {'skipped', job id, state}
#       | {'job', job id, payload, fence, seq, ntok}
PULL = (
    _HELPERS
    + r"""
local group, consumer = ARGV[1], ARGV[2]
local now, free, idle = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5] == '1'
local prefix, lease, ttl = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
local best, best_rank, best_age, last_ids = nil, nil, nil, {}
for i, q in ipairs(KEYS) do
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
  local head = redis.call('XRANGE', q, '(' .. delivered, '+', 'COUNT', 1)
  local info = redis.call('XINFO', 'STREAM', q)
  for k = 1, #info, 2 do
    if info[k] == 'last-generated-id' then last_ids[i] = info[k + 1] end
  end
  if #head > 0 then
    local age = now - tonumber(string.match(head[1][1], '^(%d+)'))
    local aging = tonumber(ARGV[8 + i])
    local rank = i
    if aging > 0 and age >= aging then rank = 0 end
    if best == nil or rank < best_rank or (rank == 0 and best_rank == 0 and age > best_age) then
      best, best_rank, best_age = {q, head[1]}, rank, age
    end
  end
end
if best == nil then
  return {'empty', unpack(last_ids)}
end
local fields = {}
for k = 1, #best[2][2], 2 do fields[best[2][2][k]] = best[2][2][k + 1] end
if not idle and tonumber(fields['cost']) > free then
  return {'full'}
end
redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', best[1], '>')
local job_id = fields['job']
local job = prefix .. job_id
local state = redis.call('HGET', job, 'state')
if state ~= 'queued' then
  redis.call('XACK', best[1], group, best[2][1])
  redis.call('XDEL', best[1], best[2][1])
  return {'skipped', job_id, tostring(state)}
end
local payload = redis.call('HGET', job, 'payload')
local deadline = cjson.decode(payload)['deadline_at_ms']
if deadline ~= cjson.null and deadline ~= nil and tonumber(deadline) <= now then
  local seq = tonumber(redis.call('HGET', job, 'seq')) + 1
  unqueue(job)
  redis.call('HSET', job, 'state', 'expired', 'seq', seq)
  emit(job .. ':log', job .. ':events',
    error_batch(seq, 'deadline_exceeded', 'the deadline passed while the job was queued', 504), ttl)
  finish_entry(job, group)
  return {'skipped', job_id, 'expired'}
end
unqueue(job)
local fence = redis.call('HINCRBY', job, 'fence', 1)
redis.call('HINCRBY', job, 'deliveries', 1)
redis.call('HSET', job, 'state', 'running', 'owner', consumer, 'lease_until', now + lease)
return {'job', job_id, payload, fence, redis.call('HGET', job, 'seq'), redis.call('HGET', job, 'ntok')}
"""
)

# KEYS: job hash, job log.
# ARGV: fence, channel, batch JSON, last seq, new tokens, ttl ms, terminal state or '', group.
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
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'state', ARGV[7])
  finish_entry(KEYS[1], ARGV[8])
end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
"""
)

# KEYS: job hash, job log.
# ARGV: channel, new state (cancelled|expired|failed), code, message, status, ttl ms, group,
#       control channel, job id.
# Returns the state the job is in afterwards.
CANCEL = (
    _HELPERS
    + r"""
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state ~= 'queued' and state ~= 'running' then return state end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq')) + 1
if state == 'queued' then unqueue(KEYS[1]) end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'seq', seq)
emit(KEYS[2], ARGV[1], error_batch(seq, ARGV[3], ARGV[4], tonumber(ARGV[5])), tonumber(ARGV[6]))
finish_entry(KEYS[1], ARGV[7])
if state == 'running' then redis.call('PUBLISH', ARGV[8], 'cancel ' .. ARGV[9]) end
return ARGV[2]
"""
)

# KEYS: job hashes.  ARGV: lease-until ms, then one fence per key.
# Returns one 1/0 per job: 0 means the lease is lost (fenced, cancelled or finished).
RENEW = r"""
local out = {}
for i, job in ipairs(KEYS) do
  if redis.call('HGET', job, 'fence') == ARGV[i + 1] and redis.call('HGET', job, 'state') == 'running' then
    redis.call('HSET', job, 'lease_until', ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
