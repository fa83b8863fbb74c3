-- Mark a model id as uploading (so Download answers "not ready"), unless a model is already
-- stored under it; the meta names the uploader (the client id; '' for operators).
-- Strict (an authenticated uploader): an id another uploader holds, uploading or stored,
-- is refused before anything is written.
-- KEYS: 1 model meta hash. ARGV: 1 ttl seconds, 2 upload id, 3 now, 4 uploader,
--       5 strict ('1'/'0').
-- Returns 'ok' (stored already), 'uploading' or 'denied' (strict only).
local state = redis.call('HGET', KEYS[1], 'state')
if ARGV[5] == '1' and state and redis.call('HGET', KEYS[1], 'uploader') ~= ARGV[4] then
  return 'denied'
end
if state == 'ok' then return 'ok' end
redis.call('HSET', KEYS[1], 'state', 'uploading', 'upload', ARGV[2], 'started_at', ARGV[3],
  'uploader', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 'uploading'
