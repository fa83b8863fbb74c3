-- A task result (model update, validation, prediction): append it to its inbound stream
-- and, if the task exists and belongs to the sender, keep the first result on the task.
-- KEYS: 1 inbound stream, 2 task hash
-- ARGV: 1 maxlen, 2 client id, 3 result field name, 4 result value, 5 now,
--       6.. stream field/value pairs
-- Returns the stream entry id.
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(fields))
if redis.call('HGET', KEYS[2], 'client_id') == ARGV[2] then
  if redis.call('HSETNX', KEYS[2], ARGV[3], ARGV[4]) == 1 then
    redis.call('HSET', KEYS[2], 'result_at', ARGV[5])
    -- A streamed task has no ActivityReport: its result is its completion.
    if redis.call('HGET', KEYS[2], 'via') == 'stream'
       and redis.call('HGET', KEYS[2], 'state') == 'delivered' then
      redis.call('HSET', KEYS[2], 'state', 'completed', 'finished_at', ARGV[5])
    end
  end
end
return id
