-- A client opens a TaskStream: put back in its queue the tasks that its earlier streams took
-- but that never got an answer (no result, no flag), e.g. because the replica holding the
-- stream died (kill -9) between taking a task and the client reading it. The 1.0.0 client
-- handles streamed tasks one by one in the stream thread and opens a new stream only after
-- the old one ended, so such a task was either never received or ended without a result;
-- either way it is handed out again (attempt 2). The set is emptied: what is taken next is
-- added again by stream_take.lua.
-- KEYS: 1 the client's stream-delivered set, 2 client queue
-- ARGV: 1 task key prefix, 2 now
-- Returns the number of tasks put back.
local tprefix = ARGV[1]
local back = {}
for _, ek in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local t = redis.call('HMGET', tprefix .. ek, 'state', 'via', 'result_at', 'flag', 'delivered_at')
  if t[1] == 'delivered' and t[2] == 'stream' and not t[3] and not t[4] then
    back[#back + 1] = {ek, tonumber(t[5]) or 0}
  end
end
redis.call('DEL', KEYS[1])
-- the queue is popped from the right: push the latest first, so the earliest comes out first
table.sort(back, function(a, b) return a[2] > b[2] end)
for _, item in ipairs(back) do
  redis.call('HSET', tprefix .. item[1], 'state', 'queued', 'requeued_at', ARGV[2])
  redis.call('RPUSH', KEYS[2], item[1])
end
return #back
