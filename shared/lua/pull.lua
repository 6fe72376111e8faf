-- PULL: a worker takes one job that fits, or learns why not (priority with aging, capacity,
-- takeover of expired leases, warm-state reservations, capabilities).
-- Capabilities: a job whose ``need`` bits this worker lacks is never taken by it. A queue
-- head it cannot serve is reserved for a live worker that can (the one with most free slots;
-- its wait as an affinity reservation's), so the heads behind it stay reachable; when no live
-- worker of the model can serve it, it fails at once (``unsupported_feature``, 400). An
-- expired lease it cannot serve is left for a capable worker (or failed the same way), and
-- the stealing of ended reservations is filtered the same way. Plain jobs (no ``need``) cost
-- no extra call.
-- A replay of a pull that claimed a job (the reply was lost, the client retried) returns that
-- claim again instead of claiming a second job: the worker hash keeps the last pull id, job
-- and fence (``pull_id``, ``pull_job``, ``pull_fence``).
-- Order: an expired lease (takeover) first; then, by priority with aging (oldest first among
-- equals), the jobs reserved for this worker, reservations whose wait ended (stolen), and the
-- queue heads. A queue head that another live worker with room holds warm (or served the
-- session's last turn) is reserved for it instead: delivered to that worker's consumer (so it
-- stays pending, and visible, in the group) and put in its inbox for at most the job's wait.
-- Returns {'empty', ms until the next lease or reservation ends or -1, last ids...} | {'full'}
--       | {'skipped', job id, state}
--       | {'job', job id, payload, fence, seq, ntok, outcome, affinity wait ms[, marks]}
-- where outcome is warm|cold|stolen|takeover, the last ids are the queues' and then the wake
-- stream's, and a job from a queue carries the 'empty' reply's marks when nothing else is
-- waiting.
local wake     = KEYS[1]  -- the model's wake stream (hand-backs, releases)
local leases   = KEYS[2]  -- the model's leases (sorted set: job id by lease end, ms)
local reserved = KEYS[3]  -- the model's reservations (sorted set: job id by end of its wait)
local members  = KEYS[4]  -- the model's workers that may hold warm state (set)
local dead     = KEYS[5]  -- the model's dead-letter stream (poison jobs)
local backlog  = KEYS[6]  -- the model's backlog hash (a claimed job leaves it)
local fair     = KEYS[7]  -- the model's fairness settings hash (a deferred job may move in)
local me       = KEYS[8]  -- this worker's hash: free tokens and slots, reservations, last pull
local inbox    = KEYS[9]  -- the jobs reserved for this worker (sorted set)
local my_warm  = KEYS[10] -- the prefix blocks this worker holds warm (set)
local queues   = {unpack(KEYS, 11)}  -- the model's queues, highest priority first
local group    = ARGV[1]  -- the workers' consumer group
local consumer = ARGV[2]  -- this worker's id (its consumer in the group)
local free     = tonumber(ARGV[3])  -- tokens this worker has free
local seqs     = ARGV[4]  -- sequence slots this worker has free
local idle     = ARGV[5] == '1'  -- '1': it runs nothing (then it takes a job larger than ``free``)
local prefix   = ARGV[6]  -- the model's key prefix ``slip:{model}:`` (keys found at run time)
local lease    = tonumber(ARGV[7])  -- ms a claim's lease lasts
local ttl      = tonumber(ARGV[8])  -- ms a failed job's log lives
local max_deliveries = tonumber(ARGV[9])  -- deliveries after which a job is poison
local aging    = cjson.decode(ARGV[10])  -- JSON list, per queue: ms after which its head ranks first (0: never)
local worker_ttl = ARGV[11]  -- ms this worker's hash lives without a pull or heartbeat
local pull_id  = ARGV[12] -- this call's id, the same when the client replays it ('': none)
local caps     = tonumber(ARGV[13]) or 0  -- bit mask of the features this worker's engine implements

-- the least wait of a reservation made for a capable worker (ms)
local CAP_WAIT = 250
local m = {prefix = prefix, leases = leases, reserved = reserved, backlog = backlog, fair = fair}
local now = redis_now()
-- may this worker serve a job needing these bits (the job hash's ``need``, or nil)?
local function can(need)
  local n = tonumber(need or '0') or 0
  return n == 0 or bit.band(n, caps) == n
end
-- the live worker (not this one) whose capabilities cover ``need``, most free slots first
local function capable(need)
  local n, best, best_slots = tonumber(need), nil, nil
  for _, w in ipairs(redis.call('SMEMBERS', members)) do
    if w ~= consumer then
      local f = redis.call('HMGET', prefix .. K.worker .. w, 'caps', 'seqs', 'rjobs')
      local c = tonumber(f[1] or '0') or 0
      if f[2] and bit.band(n, c) == n then
        local slots = tonumber(f[2]) - math.max(0, tonumber(f[3] or '0'))
        if best == nil or slots > best_slots then best, best_slots = w, slots end
      end
    end
  end
  return best
end
local UNSUPPORTED = 'no live worker of this model implements every feature the request asks for (the one that did is gone)'
if pull_id ~= '' then
  local last = redis.call('HMGET', me, 'pull_id', 'pull_job', 'pull_fence', 'pull_out', 'pull_wait')
  if last[1] == pull_id then
    -- a replay: nothing is claimed or counted again; the job claimed then, if still ours
    local job = prefix .. K.job .. last[2]
    local j = redis.call('HMGET', job, 'state', 'owner', 'fence', 'payload', 'seq', 'ntok')
    if j[1] == 'running' and j[2] == consumer and j[3] == last[3] then
      return {'job', last[2], j[4], tonumber(j[3]), j[5], j[6], last[4], tonumber(last[5])}
    end
    return {'skipped', last[2], tostring(j[1])}
  end
else
  pull_id = nil
end
local function remember(out)  -- the claim a replay of this pull returns
  if pull_id then
    redis.call('HSET', me, 'pull_id', pull_id, 'pull_job', out[2], 'pull_fence', out[4],
      'pull_out', out[7], 'pull_wait', out[8])
  end
  return out
end
redis.call('HSET', me, 'free', free, 'seqs', seqs, 'caps', caps)
redis.call('PEXPIRE', me, worker_ttl)
redis.call('SADD', members, consumer)

local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 4)
local take = nil
for _, id in ipairs(expired) do
  local job = prefix .. K.job .. id
  local st = redis.call('HMGET', job, 'state', 'need')
  if st[1] ~= 'running' then
    redis.call('ZREM', leases, id)
    return {'skipped', id, tostring(st[1])}
  end
  if can(st[2]) then take = id break end
  if capable(st[2]) == nil then  -- nobody left who can continue it
    fail(m, job_of(m, id), 'failed', 'unsupported_feature', UNSUPPORTED, 400, group, ttl)
    return {'skipped', id, 'failed'}
  end
end
if take then
  local id = take
  local job = prefix .. K.job .. id
  if not idle and tonumber(redis.call('HGET', job, 'cost')) > free then return {'full'} end
  if tonumber(redis.call('HGET', job, 'deliveries')) >= max_deliveries then
    redis.call('XADD', dead, 'MAXLEN', '~', 10000, '*', 'job', id,
      'deliveries', redis.call('HGET', job, 'deliveries'), 'owner', tostring(redis.call('HGET', job, 'owner')))
    fail(m, job_of(m, id), 'failed', 'poison_job', 'the job failed on ' .. max_deliveries .. ' workers; it was moved to the dead-letter stream', 500, group, ttl)
    return {'skipped', id, 'dead'}
  end
  if past_deadline(job, now) then
    fail(m, job_of(m, id), 'expired', 'deadline_exceeded', 'the deadline passed during a worker failover', 504, group, ttl)
    return {'skipped', id, 'expired'}
  end
  local q, entry = redis.call('HGET', job, 'queue'), redis.call('HGET', job, 'entry')
  redis.call('XCLAIM', q, group, consumer, 0, entry, 'JUSTID')
  local out = claim(m, job, id, consumer, now, lease)
  out[7], out[8] = 'takeover', 0
  return remember(out)
end

-- the first entry of queue q not yet delivered to the group (nil when there is none)
local function head_of(q)
  -- An empty queue (the usual state of all but one: a claimed entry stays until its job
  -- ends) has no head; XLEN says so in one cheap call instead of the group's two below.
  if redis.call('XLEN', q) == 0 then return nil end
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

-- what an idle worker blocks on: ms until the next lease or reservation ends (or -1), then
-- the last id of every queue and of the wake stream
local function idle_marks(out)
  local next_at = nil
  for _, z in ipairs({leases, reserved}) do
    -- the first that ends later, or has ended and is one this worker may take
    local rows = redis.call('ZRANGE', z, 0, 3, 'WITHSCORES')
    for k = 1, #rows, 2 do
      local at = tonumber(rows[k + 1])
      if at > now or can(redis.call('HGET', prefix .. K.job .. rows[k], 'need')) then
        if next_at == nil or at < next_at then next_at = at end
        break
      end
    end
  end
  out[#out + 1] = next_at and math.max(0, next_at - now) or -1
  -- A mark is the stream's last entry (0-0: none), not XINFO STREAM's last-generated-id:
  -- when the newest entries were deleted it is older than that id, which is safe (an XREAD
  -- from it returns only entries added later, as none between the two exist), and it costs
  -- half as much (XINFO STREAM also renders the first and last entries, ~6 us each here).
  for i = 1, #queues + 1 do  -- the queues, then the wake stream
    local last = redis.call('XREVRANGE', queues[i] or wake, '+', '-', 'COUNT', 1)[1]
    out[#out + 1] = last and last[1] or '0-0'
  end
  return out
end

local function rank_of(prio_index, entry_id)
  local age = now - tonumber(string.match(entry_id, '^(%d+)'))
  local age_limit = tonumber(aging[prio_index])
  if age_limit > 0 and age >= age_limit then return 0, age end
  return prio_index, age
end
local prio_index = {}
for i, name in ipairs({'high', 'normal', 'low'}) do prio_index[name] = i end

-- leading blocks of a fingerprint that the warm set ``key`` of a worker holds (holding block
-- i implies holding every block before it, so a binary search finds the longest)
local function held(key, chain)
  local lo, hi = 0, #chain
  if redis.call('SISMEMBER', key, chain[1]) == 0 then return 0 end  -- most workers: one call
  lo = 1
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if redis.call('SISMEMBER', key, chain[mid]) == 1 then lo = mid else hi = mid - 1 end
  end
  return lo
end
-- worker w's free sequence slots after what is reserved for it (< 1: full; 0 at most when it
-- lacks the tokens for a job of this cost), or nil when it is gone
local function room(w, cost)
  local f = redis.call('HMGET', prefix .. K.worker .. w, 'free', 'seqs', 'rtok', 'rjobs')
  if not f[1] then return nil end
  local slots = tonumber(f[2]) - math.max(0, tonumber(f[4] or '0'))
  if tonumber(f[1]) - math.max(0, tonumber(f[3] or '0')) < cost then slots = math.min(slots, 0) end
  return slots
end
-- a warm worker without a free slot may still be waited for (up to the wait) when it holds
-- at least this many more blocks than the puller (~512 tokens of prefill saved), by at most
-- this many jobs beyond its slots: a slot frees soon on a busy worker, a long prefill does not
local FULL_GAIN_BLOCKS, FULL_OVERBOOK = 8, 2
-- the live worker (not this one) a queued job should wait for, or nil: the one holding the
-- longest prefix of it (the session's last worker wins a tie of prefixes, then the one with
-- more free slots), if it holds more than this worker does and has room (or, for a large
-- gain, will soon). Also returns the blocks this worker holds.
local function route(job, cost, need)
  local a = redis.call('HMGET', job, 'aw', 'fp', 'session')
  if tonumber(a[1] or '0') <= 0 then return nil, 0 end
  local chain = {}
  for h in string.gmatch(a[2] or '', '%S+') do chain[#chain + 1] = h end
  local session_worker = nil
  if a[3] and a[3] ~= '' then session_worker = redis.call('GET', prefix .. K.session .. a[3]) end
  local mine = 0
  if #chain > 0 then mine = held(my_warm, chain) end
  local my_score = mine + (session_worker == consumer and 0.5 or 0)
  local best, best_score, best_slots = nil, my_score, nil
  for _, w in ipairs(redis.call('SMEMBERS', members)) do
    if w ~= consumer then
      if redis.call('EXISTS', prefix .. K.worker .. w) == 0 then
        redis.call('SREM', members, w)
      else
        local n = #chain > 0 and held(prefix .. K.warm .. w, chain) or 0
        local sc = n + (w == session_worker and 0.5 or 0)
        if need and sc > my_score and sc >= best_score then
          local nb = tonumber(need)
          if bit.band(nb, tonumber(redis.call('HGET', prefix .. K.worker .. w, 'caps') or '0') or 0) ~= nb then sc = -1 end
        end
        if sc > my_score and sc >= best_score then
          local slots = room(w, cost)
          local ok = slots and (slots >= 1 or (slots > -FULL_OVERBOOK and n - mine >= FULL_GAIN_BLOCKS))
          if ok and (sc > best_score or best_slots == nil or slots > best_slots) then
            best, best_score, best_slots = w, sc, slots
          end
        end
      end
    end
  end
  return best, mine
end
-- deliver queue q's head (job id) to worker w's consumer and put it in w's inbox
local function reserve(q, head, id, w, cost)
  local job = prefix .. K.job .. id
  local f = redis.call('HMGET', job, 'aw', 'dl')
  local until_ms = now + math.max(tonumber(f[1] or '0'), CAP_WAIT)
  local dl = tonumber(f[2] or '0')
  if dl > 0 then until_ms = math.min(until_ms, now + math.floor(math.max(0, dl - now) / 4)) end
  redis.call('XREADGROUP', 'GROUP', group, w, 'COUNT', 1, 'STREAMS', q, '>')
  redis.call('HSET', job, 'rsv', w, 'rsv_at', now, 'rsv_until', until_ms, 'aff_target', w)
  redis.call('ZADD', prefix .. K.inbox .. w, until_ms, id)
  redis.call('ZADD', reserved, until_ms, id)
  redis.call('HINCRBY', prefix .. K.worker .. w, 'rtok', cost)
  redis.call('HINCRBY', prefix .. K.worker .. w, 'rjobs', 1)
end

-- candidates: {kind, queue, entry id, job id, rank, age, cost, blocks held here}
local cands = {}
local function consider_reserved(id, kind)
  local job = prefix .. K.job .. id
  local f = redis.call('HMGET', job, 'state', 'queue', 'entry', 'prio', 'cost', 'rsv', 'need')
  if f[1] ~= 'queued' or not f[6] then  -- ended, or no longer reserved: a stale index entry
    redis.call('ZREM', reserved, id)
    if kind == 'mine' then redis.call('ZREM', inbox, id) end
    return
  end
  if kind == 'steal' and f[6] == consumer then return end  -- in the inbox already
  if not can(f[7]) then return end  -- reserved for, or left to, a worker that can serve it
  local rank, age = rank_of(prio_index[f[4]], f[3])
  cands[#cands + 1] = {kind, f[2], f[3], id, rank, age, tonumber(f[5]), 0}
end
for _, id in ipairs(redis.call('ZRANGE', inbox, 0, 15)) do consider_reserved(id, 'mine') end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', reserved, '-inf', now, 'LIMIT', 0, 4)) do consider_reserved(id, 'steal') end
for i, q in ipairs(queues) do
  local head, n_reserved = head_of(q), 0
  while head do
    local fields = {}
    for k = 1, #head[2], 2 do fields[head[2][k]] = head[2][k + 1] end
    local id, cost = fields['job'], tonumber(fields['cost'])
    local job = prefix .. K.job .. id
    local st = redis.call('HMGET', job, 'state', 'need')
    if st[1] ~= 'queued' then  -- ended while queued: drop it
      redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', q, '>')
      redis.call('XACK', q, group, head[1])
      redis.call('XDEL', q, head[1])
      head = head_of(q)
    elseif not can(st[2]) then  -- not for this worker: reserve it for one that can serve it
      local w = n_reserved < 16 and capable(st[2]) or nil
      if w then
        reserve(q, head, id, w, cost)
        n_reserved = n_reserved + 1
        head = head_of(q)
      elseif n_reserved < 16 then  -- nobody live can: an answer now rather than at the deadline
        unqueue(m, job)
        fail(m, job_of(m, id), 'failed', 'unsupported_feature', UNSUPPORTED, 400, group, ttl)
        head = head_of(q)
      else
        head = nil
      end
    else
      local target, mine = nil, 0
      if n_reserved < 16 then target, mine = route(job, cost, st[2]) end
      if target == nil then
        local rank, age = rank_of(i, head[1])
        cands[#cands + 1] = {'queue', q, head[1], id, rank, age, cost, mine}
        head = nil
      else
        reserve(q, head, id, target, cost)
        n_reserved = n_reserved + 1
        head = head_of(q)
      end
    end
  end
end

local best = nil
for _, c in ipairs(cands) do
  if best == nil or c[5] < best[5] or (c[5] == best[5] and c[6] > best[6]) then best = c end
end
if best == nil then return idle_marks({'empty'}) end
if not idle and best[7] > free then return {'full'} end

local kind, q, entry, id = best[1], best[2], best[3], best[4]
local job = prefix .. K.job .. id
local outcome, waited, picked = 'cold', 0, 0
local sf = redis.call('HMGET', job, 'session', 'sttl')
local session = sf[1] and sf[1] ~= '' and sf[1] or nil
if kind == 'queue' then
  redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', q, '>')
  -- warm: it holds some of the prefix, or served the session's last turn
  if best[8] > 0 or (session and redis.call('GET', prefix .. K.session .. session) == consumer) then
    outcome = 'warm'
  end
else
  redis.call('XCLAIM', q, group, consumer, 0, entry, 'JUSTID')
  local r = redis.call('HMGET', job, 'rsv_at', 'rsv_until')
  -- held for the warm worker (the script ends that at the wait), then until a worker pulled
  waited, picked = math.min(now, tonumber(r[2])) - tonumber(r[1]), now - tonumber(r[1])
  outcome = kind == 'mine' and 'warm' or 'stolen'
end
unqueue(m, job)
if past_deadline(job, now) then
  fail(m, job_of(m, id), 'expired', 'deadline_exceeded', 'the deadline passed while the job was queued', 504, group, ttl)
  return {'skipped', id, 'expired'}
end
if session then
  redis.call('SET', prefix .. K.session .. session, consumer, 'PX', math.max(1000, tonumber(sf[2] or '0')))
end
local aff = {'aff', outcome, 'aff_wait', waited, 'aff_picked', picked}
if kind == 'queue' then  -- a reservation's target stays as the reservation set it
  aff[7], aff[8] = 'aff_target', outcome == 'warm' and consumer or ''
end
redis.call('HSET', job, unpack(aff))
redis.call('HINCRBY', me, 'free', -best[7])
redis.call('HINCRBY', me, 'seqs', -1)
local out = claim(m, job, id, consumer, now, lease)
out[7], out[8] = outcome, waited
remember(out)
-- another candidate, or a next entry in this queue (maybe a tenant's deferred job that
-- unqueue just moved in): more is waiting
if #cands > 1 or (kind == 'queue' and head_of(q)) then return out end
-- nothing else is waiting: the worker may block on these marks instead of pulling again
return idle_marks(out)
