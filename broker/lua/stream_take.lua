-- Hand queued tasks of a client to its open TaskStream, atomically, so two replicas
-- (or a wake-up racing a recovery read) never deliver the same task twice.
-- Each task taken is also remembered in the client's stream-delivered set, so a later stream
-- can put it back if it never got an answer (stream_recover.lua).
-- At most ARGV[5] tasks and about ARGV[7] bytes of task data per call (at least one task):
-- the replica holds what it took until the client's transport accepts it, so a stream that
-- is not read holds at most one call's worth (docs/operations.md, "Slow TaskStream readers").
-- KEYS: 1 client hash, 2 client queue, 3 clients zset, 4 the client's stream-delivered set
-- ARGV: 1 now, 2 client id, 3 replica, 4 task key prefix, 5 max tasks, 6 ttl of the set,
--       7 max data bytes
-- Returns {more, then flat 7-field groups (see poll.lua's 'task' reply)}; more = 1 when
-- tasks are left in the queue.
local now, cid, replica, tprefix, limit = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local budget = tonumber(ARGV[7])
redis.call('HSET', KEYS[1], 'id', cid, 'last_seen', now, 'status', 'online', 'replica', replica)
redis.call('ZADD', KEYS[3], now, cid)
local out = {0}
local n, bytes = 0, 0
while n < limit do
  local ek = redis.call('LINDEX', KEYS[2], -1)
  if not ek then break end
  local tkey = tprefix .. ek
  if redis.call('HGET', tkey, 'state') == 'queued' then
    local size = redis.call('HSTRLEN', tkey, 'data')
    if n > 0 and bytes + size > budget then break end
    redis.call('RPOP', KEYS[2])
    redis.call('HSET', tkey, 'state', 'delivered', 'delivered_at', now, 'via', 'stream',
      'replica', replica)
    redis.call('HINCRBY', tkey, 'attempts', 1)
    redis.call('SADD', KEYS[4], ek)
    local f = redis.call('HMGET', tkey, 'correlation_id', 'type', 'model_id', 'data',
      'session_id', 'round_id', 'timestamp')
    for i = 1, 7 do out[#out + 1] = f[i] end
    n = n + 1
    bytes = bytes + size
  else
    redis.call('RPOP', KEYS[2])
  end
end
if n > 0 then redis.call('EXPIRE', KEYS[4], ARGV[6]) end
if redis.call('LLEN', KEYS[2]) > 0 then out[1] = 1 end
return out
