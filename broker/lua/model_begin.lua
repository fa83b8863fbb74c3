-- Mark a model id as uploading (so Download answers "not ready"), unless a model is already
-- stored under it. KEYS: 1 model meta hash. ARGV: 1 ttl seconds, 2 upload id, 3 now.
if redis.call('HGET', KEYS[1], 'state') == 'ok' then return 'ok' end
redis.call('HSET', KEYS[1], 'state', 'uploading', 'upload', ARGV[2], 'started_at', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 'uploading'
