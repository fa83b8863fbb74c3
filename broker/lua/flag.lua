-- Abort or time out one task (docs/protocol.md §6). A queued task is withdrawn at once; a
-- delivered or running one gets a flag its client sees on the next poll (INTERRUPTED or
-- TIMEOUT). A finished task is left alone.
-- KEYS: 1 task hash, 2 client queue
-- ARGV: 1 'abort' | 'timeout', 2 now, 3 encoded correlation id
-- Returns the task's state before the call ('' if there is no such task).
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return '' end
if state == 'queued' then
  redis.call('LREM', KEYS[2], 0, ARGV[3])
  local new = 'cancelled'
  if ARGV[1] == 'timeout' then new = 'timeout' end
  redis.call('HSET', KEYS[1], 'state', new, 'flag', ARGV[1], 'finished_at', ARGV[2])
elseif state == 'delivered' or state == 'pending' or state == 'running' then
  redis.call('HSET', KEYS[1], 'flag', ARGV[1], 'flagged_at', ARGV[2])
end
return state
