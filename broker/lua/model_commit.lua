-- Make a finished upload visible in one step: the chunk list is renamed into place (or, on
-- disk, the meta names the upload's own file) and the meta hash flips to 'ok'. The first
-- upload of an id to get here wins; a different model already stored is never replaced.
-- KEYS: 1 model meta hash, 2 model chunk list, 3 upload chunk list ('' key for disk store)
-- ARGV: 1 sha256, 2 size, 3 chunk count, 4 store ('redis'|'disk'), 5 now, 6 upload id,
--       7 disk store: the upload's file, relative to the model dir ('' for redis),
--       8 uploader (the client whose upload this is; '' for operators and workers)
-- Returns 'ok', 'same' (identical model already stored) or 'conflict'.
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'ok' then
  -- this upload's own commit, run again after its reply was lost
  if redis.call('HGET', KEYS[1], 'upload') == ARGV[6] then return 'ok' end
  if ARGV[4] == 'redis' then redis.call('DEL', KEYS[3]) end
  if redis.call('HGET', KEYS[1], 'sha256') == ARGV[1] then return 'same' end
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
  'chunks', ARGV[3], 'store', ARGV[4], 'committed_at', ARGV[5], 'upload', ARGV[6],
  'uploader', ARGV[8] or '')
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'file', ARGV[7]) end
redis.call('PERSIST', KEYS[1])
return 'ok'
