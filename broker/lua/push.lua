-- Queue one task for one client. Refuses a correlation id that is already in use.
-- KEYS: 1 task hash, 2 client queue, 3 taskref string
-- ARGV: 1 encoded correlation id, 2 ttl seconds, 3 wake channel, 4.. field/value pairs
-- Returns 1 if queued, 0 if the correlation id exists.
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], 'state', 'queued', 'attempts', 0, unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[2])
local cid = redis.call('HGET', KEYS[1], 'client_id')
redis.call('SET', KEYS[3], cid, 'EX', ARGV[2])
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 1
