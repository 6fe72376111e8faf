-- EMIT: a worker's batch of events for a job it holds: log it, publish it, count its tokens.
-- Returns 1 when written; 2 when this very write was applied already (a replay: the client
-- retried after the reply was lost; nothing is appended again); 0 when fenced off (lease lost,
-- job cancelled or finished); -1 when the batch does not start at the job's next sequence
-- number (nothing written). ``lastw`` = "fence:last seq" of the job's latest write names it:
-- within one fence every write ends at a higher seq (only a first, ``started``-only batch ends
-- at the claim's seq), so a replay is recognised even after its terminal write ended the job.
local job        = KEYS[1]  -- the job's hash
local job_log    = KEYS[2]  -- the job's event log (stream)
local leases     = KEYS[3]  -- the model's leases (sorted set), left by a terminal batch
local fence      = ARGV[1]  -- the fence of the writer's claim
local channel    = ARGV[2]  -- the job's pub/sub channel
local batch      = ARGV[3]  -- the batch as JSON
local last_seq   = ARGV[4]  -- the batch's last sequence number
local new_tokens = ARGV[5]  -- tokens the batch adds to the job's count
local ttl        = tonumber(ARGV[6])  -- ms the job's hash and log live from now
local terminal   = ARGV[7]  -- the state the batch ends the job in, or ''
local group      = ARGV[8]  -- the workers' consumer group
local job_id     = ARGV[9]  -- the job's id
local seq_before = ARGV[10] -- the job's seq before this batch (its first numbered event is the next)

local f = redis.call('HMGET', job, 'fence', 'state', 'seq', 'lastw')
local mark = fence .. ':' .. last_seq
if f[1] == fence and f[4] == mark then return 2 end
if f[1] ~= fence or f[2] ~= 'running' then return 0 end
if tonumber(f[3]) ~= tonumber(seq_before) then return -1 end
emit(job_log, channel, batch, ttl)
redis.call('HSET', job, 'seq', last_seq, 'lastw', mark)
redis.call('HINCRBY', job, 'ntok', new_tokens)
if terminal ~= '' then finish({leases = leases}, {id = job_id, key = job}, terminal, group) end
redis.call('PEXPIRE', job, ttl)
return 1
