-- Drop a failed upload: its chunks, and the 'uploading' marker if it is still ours.
-- KEYS: 1 model meta hash, 2 upload chunk list. ARGV: 1 upload id.
redis.call('DEL', KEYS[2])
if redis.call('HGET', KEYS[1], 'state') == 'uploading'
   and redis.call('HGET', KEYS[1], 'upload') == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 1
