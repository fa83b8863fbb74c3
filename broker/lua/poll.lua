-- PollAndReport, atomically (docs/protocol.md §4.2). One call per poll.
-- KEYS: 1 client hash, 2 client queue, 3 clients zset (last seen), 4 reports stream
-- ARGV: 1 now, 2 client id, 3 name, 4 replica, 5 correlation id, 6 encoded correlation id,
--       7 status, 8 done ('1'/'0'), 9 response, 10 task key prefix, 11 reports maxlen,
--       12 strict ('1': a report naming a task the client does not have writes nothing)
-- Returns {'task', <TaskRequest fields...>} | {'echo', corr, status} | {'empty'} |
--         {'unknown'} (strict only: the caller then asks whose task it is)
local now, cid, name, replica = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local corr, ecorr, status, done, response = ARGV[5], ARGV[6], ARGV[7], ARGV[8] == '1', ARGV[9]
local tprefix, maxlen = ARGV[10], ARGV[11]

-- Authenticated callers: a report must name one of the caller's own tasks (they live in its
-- slot), checked before anything, presence included, is written.
if ARGV[12] == '1' and corr ~= '' and redis.call('EXISTS', tprefix .. ecorr) == 0 then
  return {'unknown'}
end

-- presence: every poll is a liveness signal
redis.call('HSET', KEYS[1], 'id', cid, 'last_seen', now, 'status', 'online', 'replica', replica)
if name ~= '' then redis.call('HSET', KEYS[1], 'name', name) end
redis.call('ZADD', KEYS[3], now, cid)

local final = {completed = true, failed = true, interrupted = true, cancelled = true,
               timeout = true, lost = true}
local report_state = {COMPLETED = 'completed', FAILED = 'failed', INTERRUPTED = 'interrupted',
                      PENDING = 'pending', RUNNING = 'running'}

local function report(tkey, state, why)
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', maxlen, '*',
    'client_id', cid, 'correlation_id', redis.call('HGET', tkey, 'correlation_id'),
    'session_id', redis.call('HGET', tkey, 'session_id') or '',
    'round_id', redis.call('HGET', tkey, 'round_id') or '',
    'type', redis.call('HGET', tkey, 'type') or '',
    'state', state, 'response', why, 'ts', now)
end

local current_key = redis.call('HGET', KEYS[1], 'current_key') or ''

if corr ~= '' then
  local tkey = tprefix .. ecorr
  local state = redis.call('HGET', tkey, 'state')
  if done then
    if state and not final[state] then
      local new = report_state[status] or 'completed'
      if not final[new] then new = 'completed' end
      redis.call('HSET', tkey, 'state', new, 'report_status', status,
        'report_response', response, 'reported_at', now, 'finished_at', now)
      report(tkey, new, response)
    end
    if current_key == tkey then
      redis.call('HDEL', KEYS[1], 'current', 'current_key')
      current_key = ''
    end
    -- fall through: a done report may be answered with the next task
  else
    -- busy: record progress, echo abort/timeout flags; never hand out a new task
    if not state then return {'empty'} end
    if not final[state] then
      redis.call('HSET', tkey, 'state', report_state[status] or state,
        'report_status', status, 'reported_at', now)
      if current_key ~= tkey then
        redis.call('HSET', KEYS[1], 'current', corr, 'current_key', tkey)
      end
    end
    local flag = redis.call('HGET', tkey, 'flag')
    if flag == 'abort' then return {'echo', corr, 'INTERRUPTED'} end
    if flag == 'timeout' then return {'echo', corr, 'TIMEOUT'} end
    return {'echo', corr, ''}
  end
elseif status ~= '' and status ~= 'NEW' then
  return {'empty'}
end

-- The client is idle. A task we think it holds was either never received (the reply was
-- lost: hand it out again) or lost by the client (it restarted: record that).
if current_key ~= '' then
  local state = redis.call('HGET', current_key, 'state')
  if state == 'delivered' then
    redis.call('HSET', current_key, 'state', 'queued')
    redis.call('RPUSH', KEYS[2], string.sub(current_key, #tprefix + 1))
  elseif state and not final[state] then
    redis.call('HSET', current_key, 'state', 'lost', 'finished_at', now)
    report(current_key, 'lost', 'client reported idle while the task was running')
  end
  redis.call('HDEL', KEYS[1], 'current', 'current_key')
end

while true do
  local ek = redis.call('RPOP', KEYS[2])
  if not ek then return {'empty'} end
  local tkey = tprefix .. ek
  if redis.call('HGET', tkey, 'state') == 'queued' then
    redis.call('HSET', tkey, 'state', 'delivered', 'delivered_at', now, 'via', 'poll',
      'replica', replica)
    redis.call('HINCRBY', tkey, 'attempts', 1)
    local f = redis.call('HMGET', tkey, 'correlation_id', 'type', 'model_id', 'data',
      'session_id', 'round_id', 'timestamp')
    redis.call('HSET', KEYS[1], 'current', f[1], 'current_key', tkey)
    return {'task', f[1], f[2], f[3], f[4], f[5], f[6], f[7]}
  end
  -- cancelled, timed out or expired while queued: skip it
end
