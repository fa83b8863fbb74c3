-- Queue one task for each of n clients (one task: n = 1). Fields every task shares are sent
-- once, so a round's fan-out costs a few arguments per client, not a whole task each; one
-- wake-up message names every client that got a task.
-- The task's model joins the client's given-models set: the models it may download.
-- KEYS: per task i (from 0): 4i+1 task hash, 4i+2 client queue, 4i+3 taskref string,
--       4i+4 the client's given-models set
-- Every task's client is in one partition (one slot, with its wake channel).
-- ARGV: 1 ttl seconds, 2 wake channel, 3 'PUBLISH' or 'SPUBLISH' (sharded: a Cluster),
--       4 m = number of shared field/value arguments, 5..m+4 those pairs, then per task:
--       encoded correlation id, encoded client id, correlation id, client id
-- Returns per task 1 if queued, 0 if its correlation id was already in use.
local ttl, channel, publish, m = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local shared = {}
local model = ''
for i = 5, m + 4 do shared[#shared + 1] = ARGV[i] end
for i = 1, #shared, 2 do if shared[i] == 'model_id' then model = shared[i + 1] end end
local out, woken = {}, {}
for t = 0, #KEYS / 4 - 1 do
  local task, queue, ref, given = KEYS[4 * t + 1], KEYS[4 * t + 2], KEYS[4 * t + 3], KEYS[4 * t + 4]
  local a = m + 5 + 4 * t
  local enc, enc_client, corr, client = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  if redis.call('EXISTS', task) == 1 or redis.call('EXISTS', ref) == 1 then
    out[#out + 1] = 0
  else
    redis.call('HSET', task, 'state', 'queued', 'attempts', 0,
      'correlation_id', corr, 'client_id', client, unpack(shared))
    redis.call('EXPIRE', task, ttl)
    redis.call('SET', ref, client, 'EX', ttl)
    redis.call('LPUSH', queue, enc)
    if model ~= '' then
      redis.call('SADD', given, model)
      redis.call('EXPIRE', given, ttl)
    end
    woken[#woken + 1] = enc_client
    out[#out + 1] = 1
  end
end
if #woken > 0 then redis.call(publish, channel, table.concat(woken, '\n')) end
return out
