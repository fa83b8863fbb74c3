-- Make a finished upload visible in one step: the chunk list is renamed into place and the
-- meta hash flips to 'ok'. A different model already stored under the id is never replaced.
-- KEYS: 1 model meta hash, 2 model chunk list, 3 upload chunk list ('' key for disk store)
-- ARGV: 1 sha256, 2 size, 3 chunk count, 4 store ('redis'|'disk'), 5 now, 6 upload id
-- Returns 'ok', 'same' (identical model already stored) or 'conflict'.
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'ok' then
  if redis.call('HGET', KEYS[1], 'sha256') == ARGV[1] then
    if ARGV[4] == 'redis' then redis.call('DEL', KEYS[3]) end
    return 'same'
  end
  if ARGV[4] == 'redis' then redis.call('DEL', KEYS[3]) end
  return 'conflict'
end
if ARGV[4] == 'redis' then
  if tonumber(ARGV[3]) > 0 then
    redis.call('RENAME', KEYS[3], KEYS[2])
    redis.call('PERSIST', KEYS[2])
  else
    redis.call('DEL', KEYS[2])
  end
end
redis.call('HSET', KEYS[1], 'state', 'ok', 'sha256', ARGV[1], 'size', ARGV[2],
  'chunks', ARGV[3], 'store', ARGV[4], 'committed_at', ARGV[5], 'upload', ARGV[6])
redis.call('PERSIST', KEYS[1])
return 'ok'
