-- A task result (model update, validation, prediction): append it to its inbound stream
-- and, if the task exists and belongs to the sender, keep the FIRST result on the task.
-- For a model update, ARGV 6-9 describe the uploaded model's meta (read just before: it
-- lives in the model's own slot, and its uploader never changes once set): the update only
-- counts when the task was handed out to the sender (delivered, pending, running, or just
-- reported completed) and that model was uploaded and verified (state 'ok') after the
-- hand-out, so naming the seed or an older model for a queued task counts for nothing.
-- Strict (authenticated callers): the task must be the sender's and the update's model one
-- the sender uploaded, else nothing at all is written.
-- KEYS: 1 inbound stream, 2 task hash (both in the sender's partition)
-- ARGV: 1 maxlen, 2 client id, 3 now, 4 strict ('1'/'0'), 5 number of result field/value
--       pairs (n), 6 model: '' (not an update), 'none' (no such model), 'anonymous' (no
--       uploader recorded) or 'meta', 7 its uploader, 8 its state, 9 its committed_at,
--       10 .. 9+2n result pairs, then stream field/value pairs
-- Returns {stream entry id, 1 if the result was kept on the task else 0}, or strict only
-- {'', 0, why} with why 'task' (not a task of the sender), 'model' (another uploader's
-- model) or 'nomodel' (no such model).
local n = tonumber(ARGV[5])
local model, uploader, mstate, committed = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local first_stream = 10 + 2 * n
if ARGV[4] == '1' then
  if redis.call('HGET', KEYS[2], 'client_id') ~= ARGV[2] then return {'', 0, 'task'} end
  if model == 'none' then return {'', 0, 'nomodel'} end
  if model ~= '' and (model == 'anonymous' or uploader ~= ARGV[2]) then
    return {'', 0, 'model'}
  end
end
local fields = {}
for i = first_stream, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(fields))
if redis.call('HGET', KEYS[2], 'client_id') ~= ARGV[2] then return {id, 0} end
if redis.call('HEXISTS', KEYS[2], 'result_at') == 1 then return {id, 0} end
if model ~= '' then
  local handed = {delivered = true, pending = true, running = true, completed = true}
  local task = redis.call('HMGET', KEYS[2], 'state', 'delivered_at')
  if not handed[task[1]] or not task[2] then return {id, 0} end
  if mstate ~= 'ok' or committed == '' then return {id, 0} end
  if tonumber(committed) < tonumber(task[2]) then return {id, 0} end
end
for i = 10, first_stream - 1, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[2], 'result_at', ARGV[3], 'result_entry', id)
-- A streamed task has no ActivityReport: its result is its completion.
if redis.call('HGET', KEYS[2], 'via') == 'stream'
   and redis.call('HGET', KEYS[2], 'state') == 'delivered' then
  redis.call('HSET', KEYS[2], 'state', 'completed', 'finished_at', ARGV[3])
end
return {id, 1}
