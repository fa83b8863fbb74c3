-- Hand every queued task of a client to its open TaskStream, atomically, so two replicas
-- (or a wake-up racing a recovery read) never deliver the same task twice.
-- Each task taken is also remembered in the client's stream-delivered set, so a later stream
-- can put it back if it never got an answer (stream_recover.lua).
-- KEYS: 1 client hash, 2 client queue, 3 clients zset, 4 the client's stream-delivered set
-- ARGV: 1 now, 2 client id, 3 replica, 4 task key prefix, 5 max tasks, 6 ttl of the set
-- Returns a flat list of 7-field groups (see poll.lua's 'task' reply).
local now, cid, replica, tprefix, limit = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'id', cid, 'last_seen', now, 'status', 'online', 'replica', replica)
redis.call('ZADD', KEYS[3], now, cid)
local out = {}
local n = 0
while n < limit do
  local ek = redis.call('RPOP', KEYS[2])
  if not ek then break end
  local tkey = tprefix .. ek
  if redis.call('HGET', tkey, 'state') == 'queued' then
    redis.call('HSET', tkey, 'state', 'delivered', 'delivered_at', now, 'via', 'stream',
      'replica', replica)
    redis.call('HINCRBY', tkey, 'attempts', 1)
    redis.call('SADD', KEYS[4], ek)
    local f = redis.call('HMGET', tkey, 'correlation_id', 'type', 'model_id', 'data',
      'session_id', 'round_id', 'timestamp')
    for i = 1, 7 do out[#out + 1] = f[i] end
    n = n + 1
  end
end
if n > 0 then redis.call('EXPIRE', KEYS[4], ARGV[6]) end
return out
