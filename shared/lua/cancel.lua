-- CANCEL: move a queued or running job to a terminal state with an error event (a cancel, an
-- expiry, a failure the gateway decides). Returns the state the job is in afterwards
-- ('missing' when there is no such job). A replay finds the job terminal: it changes nothing
-- and returns the same state.
local job      = KEYS[1]  -- the job's hash
local job_log  = KEYS[2]  -- the job's event log (stream)
local leases   = KEYS[3]  -- the model's leases (sorted set)
local backlog  = KEYS[4]  -- the model's backlog hash (a queued job leaves it)
local fair     = KEYS[5]  -- the model's fairness settings hash (a deferred job may move in)
local reserved = KEYS[6]  -- the model's reservations (sorted set)
local prefix   = ARGV[1]  -- the model's key prefix ``slip:{model}:`` (keys found at run time)
local job_id   = ARGV[2]  -- the job's id
local state    = ARGV[3]  -- the new state: cancelled|expired|failed
local code     = ARGV[4]  -- the error event's code
local message  = ARGV[5]  -- the error event's message
local status   = tonumber(ARGV[6])  -- the error event's HTTP status
local ttl      = tonumber(ARGV[7])  -- ms the job's log lives from now
local group    = ARGV[8]  -- the workers' consumer group
local control  = ARGV[9]  -- the model's control channel (workers hear of the cancel there)
local channel  = ARGV[10] -- the job's pub/sub channel

local m = {prefix = prefix, leases = leases, backlog = backlog, fair = fair, reserved = reserved}
local was = redis.call('HGET', job, 'state')
if not was then return 'missing' end
if was ~= 'queued' and was ~= 'running' then return was end
if was == 'queued' then unqueue(m, job) end
fail(m, {id = job_id, key = job, log = job_log, channel = channel}, state, code, message, status, group, ttl)
if was == 'running' then redis.call('SPUBLISH', control, 'cancel ' .. job_id) end
return state
